"""Per-layer views of the stacked block params (model/layer_views.py): they hold the
stacked arrays' values (checked with numpy), share their memory (buffer addresses), also
shard by shard on a mesh, and take the engine's decode program's copy of the weights away
(XLA's memory analysis); generation over a mesh still equals transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import persona_jax as pj
from persona_jax.model.layer_views import layer_views
from persona_jax.runtime import engine
from persona_jax.runtime.generate import generate
from persona_jax.testing import tiny_checkpoint
from test_generate import PROMPTS, hf_generate


def _inside(part, whole) -> bool:
    """part's buffer lies inside whole's (same memory, no copy)."""
    start, size = whole.unsafe_buffer_pointer(), whole.nbytes
    p = part.unsafe_buffer_pointer()
    return start <= p and p + part.nbytes <= start + size


def test_views_alias_the_stacked_buffers_and_hold_their_values():
    rng = np.random.RandomState(0)
    host = {"w": rng.randn(4, 32, 48).astype(np.float32), "norm": rng.randn(4, 64).astype(np.float32),
            "odd": rng.randn(4, 3).astype(np.float32)}  # 12-byte layers: not 64-byte aligned
    stacked = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), host)
    views = layer_views(stacked, 4)
    assert views is not None and len(views.layers) == 4
    for l in range(4):
        for k in host:
            np.testing.assert_array_equal(np.asarray(views.layers[l][k]), host[k][l])
        assert _inside(views.layers[l]["w"], stacked["w"]) and _inside(views.layers[l]["norm"], stacked["norm"])
    # only the unaligned leaf was copied (layer 0 starts at the buffer, aligned)
    assert views.copied_bytes == 3 * host["odd"][0].nbytes


def test_views_per_shard_on_a_mesh_and_none_when_the_layer_axis_is_split():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    w = np.random.RandomState(1).randn(3, 16, 32).astype(np.float32)
    x = jax.device_put(w, NamedSharding(mesh, P(None, None, "model")))
    views = layer_views({"w": x}, 3)
    assert views is not None and views.copied_bytes == 0
    for l in range(3):
        v = views.layers[l]["w"]
        assert v.sharding.spec == P(None, "model") and v.shape == (16, 32)
        np.testing.assert_array_equal(np.asarray(v), w[l])
        whole = {s.device: s.data for s in x.addressable_shards}
        for s in v.addressable_shards:
            assert _inside(s.data, whole[s.device])
    split = jax.device_put(np.zeros((4, 8), np.float32), NamedSharding(mesh, P("data")))
    assert layer_views({"w": split}, 4) is None


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("views_llama"))
    torch_model = tiny_checkpoint(d, "llama", seed=1, initializer_range=0.4)
    return torch_model, d


def test_engine_decode_holds_no_copy_of_the_weights(llama):
    """The decode program's temporaries: with the views, less than one layer's weights;
    slicing the stacked params inside the program, at least all of them."""
    _, d = llama
    model = pj.load_model(d)
    c = model.config
    block_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(model.params["layers"]))
    spec = engine.EngineSpec(slots=8, cache_len=64, max_new=32, greedy=False, use_top_k=False, use_top_p=False,
                             eos_ids=(2,), pad_id=0, layer_loop="unrolled")
    state = engine.init_state(c, spec, model.dtype)
    views = {**model.params, "layers": layer_views(model.params["layers"], c.num_layers).layers}

    def temp(params):
        return engine.decode.lower(c, params, state, jnp.int32(8), spec=spec, chunk=4).compile() \
            .memory_analysis().temp_size_in_bytes
    assert temp(model.params) >= block_bytes
    assert temp(views) < block_bytes / c.num_layers


def test_sharded_generation_over_views_equals_hf(llama):
    torch_model, d = llama
    model = pj.load_model(d, mesh=pj.make_mesh(data=4, model=2))
    ref = hf_generate(torch_model, model.tokenizer, PROMPTS, 12)
    got = generate(model, PROMPTS, 12, temperature=0, batch_size=4, return_tokens=True).tokens
    assert got == ref
