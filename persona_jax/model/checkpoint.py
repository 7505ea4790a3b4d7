"""`load_model`: HF checkpoint directory (or hub id in the local cache) -> `Model`.

Weights stream tensor slice by tensor slice from memory-mapped safetensors straight into
their device placement (`jax.make_array_from_callback`): each device's shard is read
from disk, converted, and placed, so host RAM never holds a second copy of the model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from persona_jax.model import sharding as sh
from persona_jax.model import decoder
from persona_jax.errors import PersonaError
from persona_jax.model.config import DecoderConfig
from persona_jax.model.families import config_from_hf
from persona_jax.model.safetensors_io import SafetensorsFile

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Model:
    """A loaded decoder: architecture, (sharded) params, tokenizer, mesh.

    scan_decode: only for longrope checkpoints that `generate` keeps on static batches
    (`generate_arrays`): decode with the scanned decoder, which holds the weights once,
    instead of per-layer buffers. The continuous-batching engine, which runs every other
    generation, always holds them once.
    steering: `Steering`s that `generate`, `capture` and `forward` (and everything built
    on them) apply on every call, before any given there; set by `pj.steer`.
    """

    config: DecoderConfig
    params: Any
    tokenizer: Any = None
    mesh: Mesh | None = None
    name: str = ""
    scan_decode: bool = False
    steering: tuple = ()
    # (the params["layers"] they view, LayerViews or None): built once per model, dying
    # with it (a module-level cache would pin the weights); `dataclasses.replace` drops it
    _views: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def dtype(self):
        """The params' dtype (float32 or bfloat16), which is also the compute dtype."""
        return self.params["embed_tokens"]["embedding"].dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def layer_views(self):
        """Per-layer views of the block weights that alias the stacked params
        (`model.layer_views`; CPU), or None where the backend slices inside the program.
        Built on the first call and kept while `params["layers"]` is the same object."""
        from persona_jax.model.layer_views import layer_views
        layers = self.params["layers"]
        stale = self._views is None or self._views[0] is not layers
        if not stale and any(x.is_deleted() for x in jax.tree.leaves(layers)):  # donated: the views would dangle
            stale = True
        if stale:
            self._views = (layers, layer_views(layers, self.config.num_layers))
        return self._views[1]

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise PersonaError(f"model {self.name} has no tokenizer files; add tokenizer.json / tokenizer_config.json to its directory")
        return self.tokenizer

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        """Chat template text for one conversation (list of {role, content})."""
        from persona_jax.io import chat
        return chat.render(self.require_tokenizer(), messages, add_generation_prompt, where=self.name)

    @property
    def folds_system_prompt(self) -> bool:
        """The chat template rejects a system role, so `render_chat` folds system prompts
        into the first user turn (Gemma 2; see `persona_jax.io.chat`). Record it in reports."""
        from persona_jax.io import chat
        return self.tokenizer is not None and chat.folds_system_prompt(self.tokenizer)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return tuple(sorted(set(ids)))

    @property
    def pad_token_id(self) -> int:
        for cand in (getattr(self.tokenizer, "pad_token_id", None), self.config.pad_token_id,
                     *self.eos_token_ids):
            if cand is not None:
                return int(cand)
        return 0


def _resolve_dir(path_or_id: str) -> str:
    if os.path.isdir(path_or_id):
        return path_or_id
    looks_like_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/"))
    if not looks_like_id:
        raise PersonaError(f"model directory {path_or_id} does not exist; pass a local checkpoint directory or a hub id like Qwen/Qwen2.5-7B-Instruct")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline machine, unknown id, gated repo ...
        raise PersonaError(f"could not find {path_or_id} locally or in the Hugging Face cache ({type(e).__name__}); download it first or pass a local directory") from None


def check_checkpoint(path_or_id: str) -> str:
    """What `load_model` would refuse, found without reading a weight: the directory, a
    readable config.json, and every safetensors file's header and size (a truncated file
    fails here). Lets a runner stop before it writes anything. Returns the directory."""
    d = _resolve_dir(path_or_id)
    cfg_path = os.path.join(d, "config.json")
    if not os.path.isfile(cfg_path):
        raise PersonaError(f"{d} has no config.json; it is not a Hugging Face model directory")
    try:
        with open(cfg_path) as f:
            json.load(f)
    except ValueError as e:
        raise PersonaError(f"{cfg_path} is not valid JSON ({e})") from None
    for path in sorted(set(_weight_files(d).values())):
        if not os.path.isfile(path):
            raise PersonaError(f"weight file {path} named by the index is missing")
        SafetensorsFile(path)  # parses the header; refuses a file shorter than it says
    return d


def _weight_files(d: str) -> dict[str, str]:
    """tensor name -> file, from the index when sharded."""
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise PersonaError(f"{index} is not a valid safetensors index ({e})") from None
        return {k: os.path.join(d, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        raise PersonaError(f"no *.safetensors weights in {d}; save the model with save_pretrained(safe_serialization=True)")
    names = {}
    for f in files:
        for k in SafetensorsFile(os.path.join(d, f)).keys():
            names[k] = os.path.join(d, f)
    return names


# Where a checkpoint keeps the decoder's tensors: causal-LM layout, then the language
# model of a `Gemma3ForConditionalGeneration` as transformers 5 saves it and as the Hub's
# original Gemma 3 checkpoints store it (their vision tower is never read).
PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def hf_name(path: tuple[str, ...], layer: int | None, prefix: str = "model.") -> tuple[str, bool]:
    """Our param path -> (HF tensor name, transpose?); `prefix` is one of `PREFIXES`."""
    names = [str(getattr(k, "key", k)) for k in path]
    if names == ["embed_tokens", "embedding"]:
        return f"{prefix}embed_tokens.weight", False
    if names == ["lm_head", "kernel"]:
        return ("language_model.lm_head.weight" if prefix == "language_model.model." else "lm_head.weight"), True
    if names == ["norm", "weight"]:
        return f"{prefix}norm.weight", False
    leaf = names[-1]
    stem = ".".join(names[1:-1])
    if leaf in ("alpha_p", "alpha_n"):  # xIELU's learned scalars keep their own names
        return f"{prefix}layers.{layer}.{stem}.{leaf}", False
    suffix = "bias" if leaf == "bias" else "weight"
    return f"{prefix}layers.{layer}.{stem}.{suffix}", leaf == "kernel"


def fused_parts(config: DecoderConfig):
    """{our projection: (fused HF projection, its row offset, rows)} for fused layouts (Phi-3)."""
    c = config
    parts = {}
    if c.fused_qkv:
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        parts.update(q_proj=("qkv_proj", 0, q), k_proj=("qkv_proj", q, kv), v_proj=("qkv_proj", q + kv, kv))
    if c.fused_gate_up:
        f = c.intermediate_size
        parts.update(gate_proj=("gate_up_proj", 0, f), up_proj=("gate_up_proj", f, f))
    return parts


def fused_source(config: DecoderConfig, name: str) -> tuple[str, slice | None]:
    """HF tensor name of ours -> (the tensor to read, rows of it), for fused checkpoints:
    `...self_attn.k_proj.weight` -> (`...self_attn.qkv_proj.weight`, its k rows)."""
    parts = fused_parts(config)
    bits = name.split(".")
    if len(bits) >= 2 and bits[-2] in parts:
        fused, start, size = parts[bits[-2]]
        return ".".join(bits[:-2] + [fused, bits[-1]]), slice(start, start + size)
    return name, None


def fuse_for_export(config: DecoderConfig, tensors: dict) -> dict:
    """The inverse of `fused_source` for export: q/k/v (gate/up) rows concatenated back into
    the family's fused tensors, in torch layout ([out, in])."""
    parts = fused_parts(config)
    if not parts:
        return tensors
    out, groups = {}, {}
    for name, t in tensors.items():
        bits = name.split(".")
        if len(bits) >= 2 and bits[-2] in parts:
            fused, start, _ = parts[bits[-2]]
            groups.setdefault(".".join(bits[:-2] + [fused, bits[-1]]), []).append((start, t))
        else:
            out[name] = t
    for name, pieces in groups.items():
        out[name] = np.concatenate([t for _, t in sorted(pieces, key=lambda x: x[0])], axis=0)
    return out


class _Reader:
    def __init__(self, files: dict[str, str]):
        self.files = files
        self.open: dict[str, SafetensorsFile] = {}

    def get(self, name: str) -> SafetensorsFile:
        """The open file holding tensor `name`."""
        if name not in self.files:
            raise PersonaError(f"checkpoint is missing tensor {name}; is it a complete save of a supported model?")
        path = self.files[name]
        if path not in self.open:
            if not os.path.exists(path):
                raise PersonaError(f"weight file {path} named by the index is missing")
            self.open[path] = SafetensorsFile(path)
        f = self.open[path]
        if name not in f:
            raise PersonaError(f"{path} does not contain tensor {name} although the index says so")
        return f


def _load_leaf(reader: _Reader, path, shape_dtype, sharding, stacked: bool, num_layers: int,
               config: DecoderConfig | None = None, prefix: str = "model."):
    """Build one (sharded) param leaf, reading only the slices each device needs."""
    shape, dtype = tuple(shape_dtype.shape), shape_dtype.dtype

    def read_layer(layer, idx):
        name, transpose = hf_name(path, layer, prefix)
        name, rows = fused_source(config, name) if config is not None else (name, None)
        f = reader.get(name)
        have = f.shape(name)
        want = shape[1:] if stacked else shape
        if rows is not None:  # one block of rows of a fused tensor (qkv_proj, gate_up_proj)
            if have[0] < rows.stop:
                raise PersonaError(f"tensor {name} has shape {have}, too few rows for the "
                                   f"q/k/v or gate/up sizes config.json implies")
            t = f.read(name, (rows, slice(None)))
            t = t.T if transpose else t
            if tuple(t.shape) != tuple(want):
                raise PersonaError(f"tensor {name} rows {rows.start}:{rows.stop} have shape {t.shape[::-1] if transpose else t.shape}, "
                                   f"but config.json implies {tuple(want[::-1] if transpose else want)}")
            return np.asarray(t[idx], dtype=dtype)
        if (have[::-1] if transpose else have) != tuple(want):
            raise PersonaError(f"tensor {name} has shape {have}, but config.json implies {tuple(want[::-1] if transpose else want)}")
        return np.asarray(f.read(name, idx, transpose), dtype=dtype)

    def callback(index):
        if not stacked:
            return read_layer(None, index)
        layers = range(*index[0].indices(num_layers))
        return np.stack([read_layer(i, tuple(index[1:])) for i in layers])

    return jax.make_array_from_callback(shape, sharding, callback)


def load_params(directory: str, config: DecoderConfig, dtype=jnp.float32, mesh: Mesh | None = None):
    """Stream a checkpoint's weights into (sharded) device arrays."""
    reader = _Reader(_weight_files(directory))
    prefix = next((p for p in PREFIXES if f"{p}embed_tokens.weight" in reader.files), "model.")
    shapes = decoder.param_shapes(config, dtype)
    if mesh is not None:
        shardings = sh.param_shardings(shapes, mesh)
    else:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), shapes)

    def leaf(path, sd, shd):
        stacked = str(getattr(path[0], "key", path[0])) == "layers"
        return _load_leaf(reader, path, sd, shd, stacked, config.num_layers, config, prefix)

    return jax.tree_util.tree_map_with_path(leaf, shapes, shardings)


def _load_tokenizer(d: str):
    if not any(os.path.exists(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        logging.warning("%s has no tokenizer files: token-id inputs only", d)
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(d)
    except Exception as e:
        raise PersonaError(f"the tokenizer in {d} could not be loaded ({type(e).__name__}: {e})") from None


def load_model(path_or_id: str, dtype: str = "float32", mesh: Mesh | None = None,
               scan_decode: bool = False) -> Model:
    """Load a Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / OLMo 2 / OLMo 3 / Apertus / Phi-3 checkpoint.

    Args:
      path_or_id: a local directory with config.json, *.safetensors (optionally sharded
        with an index) and tokenizer files; or a hub id already in the local HF cache.
      dtype: "float32" or "bfloat16" for params and compute.
      mesh: a mesh with axes "data" and "model" (Auto or Explicit axis types, e.g.
        `jax.make_mesh((4, 2), ("data", "model"))` or `pj.make_mesh`) to shard params
        over; None = the mesh set with `jax.set_mesh`, if any, else the first device.
      scan_decode: see `Model.scan_decode`.
    """
    if mesh is None:
        mesh = sh.context_mesh()
    sh.check_mesh(mesh, "mesh passed to load_model")
    if dtype not in DTYPES:
        raise PersonaError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
    d = _resolve_dir(str(path_or_id))
    cfg_path = os.path.join(d, "config.json")
    if not os.path.exists(cfg_path):
        raise PersonaError(f"{d} has no config.json; it is not a Hugging Face model directory")
    try:
        with open(cfg_path) as f:
            hf_cfg = json.load(f)
    except ValueError as e:
        raise PersonaError(f"{cfg_path} is not valid JSON ({e})") from None
    config = config_from_hf(hf_cfg, cfg_path)
    params = load_params(d, config, DTYPES[dtype], mesh)
    return Model(config=config, params=params, tokenizer=_load_tokenizer(d), mesh=mesh, name=str(path_or_id),
                 scan_decode=bool(scan_decode))
