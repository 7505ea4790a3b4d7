"""llama.cpp control vectors (.gguf): ours read by the `gguf` package's own reader, and a
file written the way repeng writes one read by ours."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from persona_jax.errors import PersonaError  # noqa: E402
from persona_jax.io import vectors  # noqa: E402


def _field_str(reader, key):
    return bytes(reader.get_field(key).parts[-1]).decode("utf-8")


def test_export_read_by_gguf_reader(tmp_path):
    L, D = 5, 12
    arr = np.random.default_rng(0).normal(size=(L + 1, D)).astype(np.float32)
    path = vectors.export_gguf(arr, tmp_path / "evil_response_avg_diff.gguf", model_hint="llama")
    reader = gguf.GGUFReader(str(path))
    assert _field_str(reader, "general.architecture") == "controlvector"
    assert _field_str(reader, "controlvector.model_hint") == "llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == L - 1
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    # llama.cpp adds direction.N after block N (from 0) = HF hidden state N + 1 = our row N + 1
    assert sorted(got) == sorted(f"direction.{n}" for n in range(1, L))
    for n in range(1, L):
        assert got[f"direction.{n}"].dtype == np.float32
        np.testing.assert_array_equal(got[f"direction.{n}"].reshape(-1), arr[n + 1])
    # and back through ours: the rows llama.cpp has no place for come back as zeros
    vec = vectors.load_any(path)
    assert (vec.trait, vec.reduction, vec.model_id) == ("evil", "response_avg", "llama")
    np.testing.assert_array_equal(vec.array[2:], arr[2:])
    assert not vec.array[:2].any()


def test_repeng_style_file_read_by_ours(tmp_path):
    # the calls repeng's ControlVector.export_gguf makes: its layer ids are block indices
    D, directions = 8, {3: np.arange(8, dtype=np.float32), 1: -np.ones(8, np.float32), 6: np.full(8, 0.5, np.float32)}
    path = tmp_path / "happy.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, v in directions.items():
        writer.add_tensor(f"direction.{layer}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    arr, hint = vectors.import_gguf(path, num_layers=8)
    assert hint == "mistral" and arr.shape == (9, D)
    expect = np.zeros((9, D), np.float32)
    for layer, v in directions.items():
        expect[layer + 1] = v
    np.testing.assert_array_equal(arr, expect)
    # without num_layers the last direction's block is the last block
    assert vectors.import_gguf(path)[0].shape == (8, D)


def test_bad_gguf_files(tmp_path):
    other = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(PersonaError, match="architecture 'llama'"):
        vectors.import_gguf(other)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(PersonaError, match="not a readable GGUF"):
        vectors.load_any(junk)
    with pytest.raises(PersonaError, match="at least two blocks"):
        vectors.export_gguf(np.zeros((2, 4)), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
