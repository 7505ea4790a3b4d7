"""Persona vector files: Orbax checkpoints with metadata, the reference's `.pt` layout,
`.npy`, and shape checks (METHOD.md 5, 10)."""
import numpy as np
import pytest
import torch

from persona_jax.errors import PersonaError
from persona_jax.io.vectors import (
    PersonaVector,
    check_vector_shape,
    export_npy,
    export_pt,
    import_npy,
    import_pt,
    load_any,
    load_vector,
    save_vector,
    vector_filename,
)

L, D = 4, 8


def rand(seed=0, shape=(L + 1, D)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_export_pt_loads_with_torch_to_same_numbers(tmp_path):
    arr = rand()
    path = export_pt(arr, tmp_path / vector_filename("evil", "response_avg"))
    assert path.name == "evil_response_avg_diff.pt"
    t = torch.load(path, weights_only=True)  # what the reference does (minus weights_only)
    assert type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu"
    assert tuple(t.shape) == (L + 1, D)
    np.testing.assert_array_equal(t.numpy(), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["evil_response_avg_diff.pt"]
    # byte for byte what torch.save(tensor, path) writes (the archive's folder is named
    # after the file, not after a temp name), so two runs' files are identical
    (tmp_path / "ref").mkdir()
    torch.save(torch.from_numpy(arr), tmp_path / "ref" / path.name)
    assert path.read_bytes() == (tmp_path / "ref" / path.name).read_bytes()


def test_reference_torch_save_loads(tmp_path):
    # the reference: stack over layers of mean(pos) - mean(neg) in float32, then torch.save
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(L + 1, 6, D, generator=g, dtype=torch.float64)
    neg = torch.randn(L + 1, 5, D, generator=g, dtype=torch.float64)
    vec = torch.stack([pos[l].mean(0).float() - neg[l].mean(0).float() for l in range(L + 1)])
    torch.save(vec, tmp_path / "evil_prompt_last_diff.pt")
    want = (pos.numpy().mean(1).astype(np.float32) - neg.numpy().mean(1).astype(np.float32))
    got = load_any(tmp_path / "evil_prompt_last_diff.pt")
    assert got.trait == "evil" and got.reduction == "prompt_last"
    assert got.array.dtype == np.float32
    np.testing.assert_allclose(got.array, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_import_pt_any_float_dtype(tmp_path, dtype):
    t = torch.tensor(rand(1)).to(dtype)
    torch.save(t, tmp_path / "v.pt")
    got = import_pt(tmp_path / "v.pt")
    assert got.dtype == np.float32
    # bf16/fp16 -> fp32 is exact; compare to torch's own conversion
    np.testing.assert_array_equal(got, t.to(torch.float32).numpy())


def test_import_pt_rejects_non_vectors(tmp_path):
    torch.save({"v": torch.zeros(2, 2)}, tmp_path / "d.pt")
    with pytest.raises(PersonaError, match="holds a dict"):
        import_pt(tmp_path / "d.pt")
    torch.save(torch.zeros(3, 2, dtype=torch.int64), tmp_path / "i.pt")
    with pytest.raises(PersonaError, match="not a float"):
        import_pt(tmp_path / "i.pt")
    torch.save(torch.zeros(5), tmp_path / "one.pt")
    with pytest.raises(PersonaError, match=r"shape \(5,\)"):
        import_pt(tmp_path / "one.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(PersonaError, match="could not be read"):
        import_pt(tmp_path / "junk.pt")
    with pytest.raises(PersonaError, match="does not exist"):
        import_pt(tmp_path / "none.pt")


def test_orbax_round_trip_with_metadata(tmp_path):
    vec = PersonaVector(rand(2), trait="sycophantic", reduction="prompt_avg",
                        model_id="Qwen/Qwen2.5-7B-Instruct", n_kept=123,
                        config={"threshold": 50, "layers": [1, 2], "nested": {"a": "b"}})
    d = save_vector(vec, tmp_path / "vecs" / "syc")
    got = load_vector(d)
    np.testing.assert_array_equal(got.array, vec.array)
    assert got.array.dtype == np.float32
    assert (got.trait, got.reduction, got.model_id, got.n_kept, got.config) == (
        "sycophantic", "prompt_avg", "Qwen/Qwen2.5-7B-Instruct", 123,
        {"threshold": 50, "layers": [1, 2], "nested": {"a": "b"}})
    assert (got.num_layers, got.hidden_size) == (L, D)
    with pytest.raises(PersonaError, match="already exists"):
        save_vector(vec, d)
    vec2 = PersonaVector(rand(3), trait="sycophantic", reduction="response_avg")
    save_vector(vec2, d, overwrite=True)
    np.testing.assert_array_equal(load_vector(d).array, vec2.array)
    assert load_vector(d).reduction == "response_avg"
    assert sorted(p.name for p in (tmp_path / "vecs").iterdir()) == ["syc"]  # no leftovers
    assert load_any(d).trait == "sycophantic"


def test_npy_round_trip_and_load_any_dispatch(tmp_path):
    arr = rand(4)
    p = export_npy(arr, tmp_path / "evil_response_avg_diff.npy")
    np.testing.assert_array_equal(np.load(p), arr)
    np.testing.assert_array_equal(import_npy(p), arr)
    v = load_any(p)
    assert (v.trait, v.reduction) == ("evil", "response_avg")
    export_pt(arr.astype(np.float64), tmp_path / "custom.pt")
    v = load_any(tmp_path / "custom.pt")
    assert (v.trait, v.reduction) == ("custom", None)
    assert load_any(tmp_path / "custom.pt", trait="evil", reduction="prompt_avg").reduction == \
        "prompt_avg"
    (tmp_path / "v.txt").write_text("1 2")
    with pytest.raises(PersonaError, match="unknown type"):
        load_any(tmp_path / "v.txt")
    with pytest.raises(PersonaError, match="does not exist"):
        load_any(tmp_path / "nope.bin")
    with pytest.raises(PersonaError, match="not a persona-vector checkpoint"):
        load_any(tmp_path)


def test_wrong_shape_refused():
    check_vector_shape(rand(), L, D, "v.pt")  # fine
    with pytest.raises(PersonaError) as e:
        check_vector_shape(rand(shape=(L, D)), L, D, "evil_response_avg_diff.pt",
                           model="model Qwen/Qwen2.5-7B-Instruct")
    assert str(e.value).startswith(
        f"vector evil_response_avg_diff.pt has shape ({L}, {D}) but model "
        f"Qwen/Qwen2.5-7B-Instruct needs ({L + 1}, {D})")
    with pytest.raises(PersonaError, match=r"\(5, 7\)"):
        check_vector_shape(rand(shape=(5, 7)), L, D, "x")


def test_orbax_metadata_converts_numpy_and_configdict(tmp_path):
    import ml_collections

    cfg = ml_collections.ConfigDict({"threshold": np.float32(50.0), "layers": np.arange(2)})
    vec = PersonaVector(rand(), trait="evil", n_kept=np.int64(7),
                        config={"run": cfg, "path": tmp_path})
    got = load_vector(save_vector(vec, tmp_path / "v"))
    assert got.n_kept == 7 and got.config == {"run": {"threshold": 50.0, "layers": [0, 1]},
                                              "path": str(tmp_path)}
    with pytest.raises(PersonaError, match="JSON cannot store"):
        save_vector(PersonaVector(rand(), trait="evil", config={"f": object()}), tmp_path / "w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # nothing half-written


def test_persona_vector_validation():
    with pytest.raises(PersonaError, match="reduction 'mean'"):
        PersonaVector(rand(), trait="evil", reduction="mean")
    with pytest.raises(PersonaError, match="2-D"):
        PersonaVector(np.zeros(3, np.float32), trait="evil")
    v = PersonaVector(rand().astype(np.float64), trait="evil")
    assert v.array.dtype == np.float32
