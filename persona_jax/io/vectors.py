"""Persona vectors on disk (METHOD.md 5, 10).

- Our format: an Orbax checkpoint directory with two items, `vector` ({"array":
  float32 [L+1, D]}) and `metadata` (JSON: trait, reduction, model id, L, D, samples
  kept, config).
- The reference's format: `{trait}_{reduction}_diff.pt`, a `torch.save`d CPU float32
  tensor [L+1, D] (row 0 = embeddings, row l = output of block l-1, last row after the
  final norm). Vectors are stored unnormalised.
- `.npy`: the bare float32 array [L+1, D].
- `.gguf`: a llama.cpp control vector (also what repeng and ollama exchange), see
  `export_gguf`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from persona_jax.io.atomic import atomic_path
from persona_jax.errors import PersonaError
from persona_jax.io.distributed import writer_only

#: The method's three reductions of a hidden state over a (prompt, response) (METHOD.md 5):
#: the mean over the prompt's tokens, its last token, the mean over the response's tokens.
REDUCTIONS = ("prompt_avg", "prompt_last", "response_avg")
FORMAT_VERSION = 1
_REF_NAME = re.compile(r"^(?P<trait>.+)_(?P<reduction>prompt_avg|prompt_last|response_avg)_diff$")


@dataclasses.dataclass
class PersonaVector:
    """A persona vector for every layer.

    Attributes:
      array: float32 [L+1, D]; row l is the direction for hidden state l (HF
        `output_hidden_states` indexing).
      trait: trait name ("evil").
      reduction: "prompt_avg", "prompt_last", "response_avg", or None when unknown (a
        file imported under a name that does not say).
      model_id: the model it was extracted from ("" if unknown).
      n_kept: number of pos/neg pairs that survived filtering (None if unknown).
      config: free-form JSON-serialisable settings of the extraction run.
      second_moment: optional float32 [len(second_moment_layers), D, D], the residual
        stream's second moment at those layers on neutral text (`pj.second_moment`), for
        `pj.whiten`; saved beside the array in the Orbax checkpoint.
      second_moment_layers: the hidden states of `second_moment`'s rows.
    """

    array: np.ndarray
    trait: str
    reduction: Optional[str] = "response_avg"
    model_id: str = ""
    n_kept: Optional[int] = None
    config: dict = dataclasses.field(default_factory=dict)
    second_moment: Optional[np.ndarray] = None
    second_moment_layers: tuple = ()

    def __post_init__(self):
        self.array = _as_float32_2d(self.array, f"persona vector for trait {self.trait!r}")
        if self.second_moment is not None:
            sm = np.asarray(self.second_moment, np.float32)
            layers = tuple(int(l) for l in self.second_moment_layers)
            d = self.array.shape[1]
            if sm.ndim != 3 or sm.shape[1:] != (d, d) or sm.shape[0] != len(layers):
                raise PersonaError(f"second_moment has shape {tuple(sm.shape)}; this vector needs "
                                   f"({len(layers)}, {d}, {d}), one [D, D] matrix per second_moment_layers entry")
            if any(not 0 <= l < self.array.shape[0] for l in layers):
                raise PersonaError(f"second_moment_layers {layers} lie outside 0..{self.array.shape[0] - 1}")
            check_second_moment(sm)
            self.second_moment, self.second_moment_layers = sm, layers
        if self.reduction is not None and self.reduction not in REDUCTIONS:
            raise PersonaError(f"reduction {self.reduction!r} of the {self.trait!r} vector is "
                               f"unknown; use one of {', '.join(REDUCTIONS)}.")

    @property
    def num_layers(self) -> int:
        """L, the number of decoder blocks (the array has L+1 rows)."""
        return self.array.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        """D, the width of each row."""
        return self.array.shape[1]

    @property
    def metadata(self) -> dict:
        """The JSON metadata stored beside the array (trait, reduction, model id, L, D,
        samples kept, config), as plain JSON types."""
        return {
            "format_version": FORMAT_VERSION,
            "trait": self.trait,
            "reduction": self.reduction,
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "n_kept": None if self.n_kept is None else int(self.n_kept),
            "config": _plain_json(self.config, f"config of the {self.trait!r} vector"),
            "second_moment_layers": list(self.second_moment_layers) if self.second_moment is not None else None,
        }

    def sigma(self, layer: int) -> np.ndarray:
        """The stored second moment at hidden state `layer` ([D, D]), for `pj.whiten`."""
        if self.second_moment is None or layer not in self.second_moment_layers:
            raise PersonaError(f"this {self.trait!r} vector holds no second moment at layer {layer} "
                               f"(it has {list(self.second_moment_layers)}); compute one with pj.second_moment")
        return self.second_moment[self.second_moment_layers.index(layer)]


def check_second_moment(mats: np.ndarray, tol: float = 1e-6):
    """A PersonaError unless every [D, D] matrix is symmetric positive semi-definite
    (up to `tol`, relative to its largest entry)."""
    for m in np.asarray(mats, np.float64).reshape((-1,) + np.shape(mats)[-2:]):
        if not np.all(np.isfinite(m)):
            raise PersonaError("second-moment matrix contains NaN or inf")
        scale = max(float(np.abs(m).max()), 1e-30)
        if np.abs(m - m.T).max() > tol * scale:
            raise PersonaError("second-moment matrix is not symmetric")
        if np.linalg.eigvalsh((m + m.T) / 2).min() < -tol * scale * m.shape[0]:
            raise PersonaError("second-moment matrix is not positive semi-definite")


def _plain_json(obj: Any, where: str) -> Any:
    """`obj` as plain JSON types (numpy scalars/arrays, ConfigDicts and paths converted)."""

    def default(o):
        if isinstance(o, (np.generic, np.ndarray)):
            return o.tolist()
        if hasattr(o, "to_dict"):  # ml_collections.ConfigDict
            return o.to_dict()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(type(o).__name__)

    try:
        return json.loads(json.dumps(obj, default=default))
    except (TypeError, ValueError) as e:
        raise PersonaError(f"{where} holds a value JSON cannot store ({e}); keep it to "
                           "numbers, strings, lists and dicts.") from None


def _as_float32_2d(array: Any, where: str) -> np.ndarray:
    arr = np.asarray(array)
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        raise PersonaError(f"{where} has dtype {arr.dtype}, not a float type; store the "
                           "vector as floats.")
    if arr.ndim != 2:
        raise PersonaError(f"{where} has shape {tuple(arr.shape)} but a persona vector is 2-D "
                           "[num_layers + 1, hidden_size]; save the full per-layer tensor.")
    return np.ascontiguousarray(arr, dtype=np.float32)


def vector_filename(trait: str, reduction: str, suffix: str = ".pt") -> str:
    """The reference's file name, e.g. "evil_response_avg_diff.pt"."""
    return f"{trait}_{reduction}_diff{suffix}"


def parse_vector_filename(path: str | os.PathLike) -> tuple[str, Optional[str]]:
    """(trait, reduction) from a reference-style name; (stem, None) if it is not one."""
    stem = Path(path).name
    for suffix in (".pt", ".npy", ".gguf"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    m = _REF_NAME.match(stem)
    return (m["trait"], m["reduction"]) if m else (stem, None)


def check_vector_shape(
    array: Any, num_layers: int, hidden_size: int, where: str, model: str = "the model"
) -> None:
    """Refuse a vector whose shape is not [num_layers + 1, hidden_size]."""
    shape = tuple(np.shape(array))
    want = (num_layers + 1, hidden_size)
    if shape != want:
        raise PersonaError(
            f"vector {where} has shape {shape} but {model} needs {want} (num_layers + 1, "
            "hidden_size); use a vector extracted from this model."
        )


# ---- Orbax ----------------------------------------------------------------------------
def _composite_handler():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _save_composite(directory, overwrite: bool, arrays: dict, metadata: dict, what: str) -> Path:
    """One Orbax checkpoint directory {vector: arrays, metadata: JSON}, written to a
    temporary sibling and renamed into place (a crash never leaves a half-written one)."""
    directory = Path(directory).resolve()  # Orbax requires absolute paths
    if directory.exists() and not overwrite:
        raise PersonaError(f"{what} directory {directory} already exists; pass overwrite=True "
                           "or choose another directory.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    target = tmp / "ckpt"
    try:
        ocp, ckptr = _composite_handler()
        with ckptr:
            ckptr.save(target, ocp.args.Composite(vector=ocp.args.StandardSave(arrays),
                                                   metadata=ocp.args.JsonSave(metadata)))
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.rename(directory, old)
        os.rename(target, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def save_vector(vec: PersonaVector, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save `vec` as an Orbax checkpoint directory (array + JSON metadata).

    The checkpoint is written to a temporary sibling and renamed into place, so a crash
    never leaves a half-written `directory`; an existing one is replaced only with
    `overwrite=True`.
    """
    arrays = {"array": vec.array} if vec.second_moment is None else {"array": vec.array,
                                                                     "second_moment": vec.second_moment}
    return _save_composite(directory, overwrite, arrays, vec.metadata, "vector")


def save_vector_set(arrays: dict, metadata: dict, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Many vectors in one Orbax record (e.g. a trace: {checkpoint: {reduction: [L+1, D]}})
    with JSON metadata (e.g. each checkpoint's step and tokens); atomic as `save_vector`."""
    import jax
    arrays = jax.tree.map(lambda a: np.asarray(a, np.float32), arrays)
    return _save_composite(directory, overwrite, arrays, _plain_json(metadata, str(directory)), "vector set")


def load_vector_set(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(arrays, metadata) of a record written by `save_vector_set`."""
    directory = Path(directory).resolve()
    if not (directory / "metadata").is_dir() or not (directory / "vector").is_dir():
        raise PersonaError(f"{directory} is not a vector-set checkpoint (no 'vector' and 'metadata' items)")
    ocp, ckptr = _composite_handler()
    with ckptr:
        out = ckptr.restore(directory, ocp.args.Composite(vector=ocp.args.StandardRestore(),
                                                          metadata=ocp.args.JsonRestore()))
    import jax
    return jax.tree.map(np.asarray, out["vector"]), dict(out["metadata"])


def load_vector(directory: str | os.PathLike) -> PersonaVector:
    """Load a vector saved by `save_vector`."""
    directory = Path(directory).resolve()
    if not (directory / "metadata").is_dir() or not (directory / "vector").is_dir():
        raise PersonaError(f"{directory} is not a persona-vector checkpoint (no 'vector' and "
                           "'metadata' items); pass a directory written by save_vector.")
    ocp, ckptr = _composite_handler()
    with ckptr:
        out = ckptr.restore(directory, ocp.args.Composite(
            vector=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
    meta = dict(out["metadata"])
    vec = PersonaVector(array=np.asarray(out["vector"]["array"]), trait=meta["trait"],
                        reduction=meta.get("reduction"), model_id=meta.get("model_id", ""),
                        n_kept=meta.get("n_kept"), config=meta.get("config") or {},
                        second_moment=None if out["vector"].get("second_moment") is None
                        else np.asarray(out["vector"]["second_moment"]),
                        second_moment_layers=tuple(meta.get("second_moment_layers") or ()))
    check_vector_shape(vec.array, meta["num_layers"], meta["hidden_size"], str(directory),
                       model="its own metadata")
    return vec


# ---- reference .pt and .npy -----------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError:
        raise PersonaError("reading or writing .pt vectors needs PyTorch; run `pip install "
                           "torch` (CPU build is enough) or use .npy / Orbax files.") from None
    return torch


def _write_atomic(path: Path, write) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return path


@writer_only
def export_pt(array: Any, path: str | os.PathLike) -> Path:
    """Write float32 [L+1, D] as the reference does: `torch.save(cpu float32 tensor, path)`."""
    torch = _torch()
    arr = _as_float32_2d(array, f"vector for {path}")
    tensor = torch.from_numpy(arr.copy())  # own the memory, contiguous, float32 on CPU
    path = Path(path)
    # saved under the final name first: torch.save names the archive's root folder after
    # the file, so a temp name would make every run's bytes differ from the reference's
    with tempfile.TemporaryDirectory() as d:
        staged = Path(d) / path.name
        torch.save(tensor, staged)
        data = staged.read_bytes()
    return _write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def import_pt(path: str | os.PathLike) -> np.ndarray:
    """Read a reference `.pt` vector -> float32 numpy [L+1, D] (any float dtype accepted)."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise PersonaError(f"vector file {path} does not exist; check the path.")
    try:
        # weights_only: a plain tensor needs no pickled code, and this refuses any.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PersonaError(f"vector file {path} could not be read by torch.load ({type(e).__name__}"
                           f": {str(e).splitlines()[0][:150]}); pass a tensor saved with "
                           "torch.save.") from None
    if not isinstance(obj, torch.Tensor):
        raise PersonaError(f"vector file {path} holds a {type(obj).__name__}, not a tensor; save "
                           "the [num_layers + 1, hidden_size] tensor itself.")
    if not obj.is_floating_point():
        raise PersonaError(f"vector file {path} has dtype {obj.dtype}, not a float type; store "
                           "the vector as floats.")
    return _as_float32_2d(obj.detach().to(torch.float32).numpy(), f"vector file {path}")


@writer_only
def export_npy(array: Any, path: str | os.PathLike) -> Path:
    """Write float32 [L+1, D] as `.npy`, atomically."""
    arr = _as_float32_2d(array, f"vector for {path}")

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)

    return _write_atomic(Path(path), write)


def import_npy(path: str | os.PathLike) -> np.ndarray:
    """Read a `.npy` vector -> float32 [L+1, D]."""
    path = Path(path)
    if not path.is_file():
        raise PersonaError(f"vector file {path} does not exist; check the path.")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise PersonaError(f"vector file {path} is not a plain .npy array ({e}); save it with "
                           "numpy.save.") from None
    return _as_float32_2d(arr, f"vector file {path}")


# ---------------------------------------------------------------- llama.cpp control vectors
GGUF_ARCH = "controlvector"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PersonaError("reading or writing .gguf control vectors needs the `gguf` package; "
                           "run `pip install gguf`.") from None
    return gguf


@writer_only
def export_gguf(array: Any, path: str | os.PathLike, model_hint: str = "") -> Path:
    """Write float32 [L+1, D] as a llama.cpp control vector (`--control-vector-scaled FILE c`).

    The layer mapping: llama.cpp adds tensor `direction.N` (N >= 1) to the output of block N
    counted from 0, after its MLP residual, which is hidden state N + 1 in HF indexing: so
    direction.N = row N + 1, for N = 1 .. L-1. Rows 0 (embeddings) and 1 (block 0's output)
    have no place in the format (llama.cpp refuses direction.0) and are not written. The
    file's keys: `general.architecture = "controlvector"`, `controlvector.model_hint`
    (e.g. "llama"), `controlvector.layer_count` (the number of direction tensors, as repeng
    writes it). Values are the vector as stored (unnormalised); llama.cpp scales it by c.
    """
    gguf = _gguf()
    arr = _as_float32_2d(array, f"vector for {path}")
    if arr.shape[0] < 3:
        raise PersonaError(f"vector for {path} has {arr.shape[0]} rows; a control vector needs "
                           "hidden states of at least two blocks ([num_layers + 1, hidden_size]).")

    def write(tmp):
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", arr.shape[0] - 2)
        for n in range(1, arr.shape[0] - 1):
            writer.add_tensor(f"direction.{n}", np.ascontiguousarray(arr[n + 1]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _write_atomic(Path(path), write)


def import_gguf(path: str | os.PathLike, num_layers: Optional[int] = None) -> tuple[np.ndarray, str]:
    """Read a llama.cpp / repeng control vector -> (float32 [L+1, D], model_hint).

    Row N + 1 = `direction.N` (see `export_gguf`); rows the file does not hold are zero.
    L is `num_layers` when given, else the last direction's block + 1.
    """
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise PersonaError(f"vector file {path} does not exist; check the path.")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise PersonaError(f"vector file {path} is not a readable GGUF file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:150] if str(e) else ''}).") from None
    arch = reader.get_field("general.architecture")
    arch = bytes(arch.parts[-1]).decode("utf-8") if arch is not None else None
    if arch != GGUF_ARCH:
        raise PersonaError(f"vector file {path} is a GGUF file of architecture {arch!r}, not a "
                           f"control vector ({GGUF_ARCH!r}).")
    hint = reader.get_field(f"{GGUF_ARCH}.model_hint")
    hint = bytes(hint.parts[-1]).decode("utf-8") if hint is not None else ""
    rows = {}
    for t in reader.tensors:
        name = t.name
        if not name.startswith("direction."):
            continue
        try:
            n = int(name.split(".", 1)[1])
        except ValueError:
            n = -1
        if n < 1:
            raise PersonaError(f"vector file {path} has tensor {name!r}; control vector layers are "
                               "direction.N with N >= 1.")
        rows[n] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not rows:
        raise PersonaError(f"vector file {path} holds no direction.N tensor.")
    widths = {v.shape[0] for v in rows.values()}
    if len(widths) != 1:
        raise PersonaError(f"vector file {path} has directions of different widths {sorted(widths)}.")
    L = num_layers if num_layers is not None else max(rows) + 1
    if max(rows) + 1 > L:
        raise PersonaError(f"vector file {path} has direction.{max(rows)}, beyond a model of {L} layers.")
    arr = np.zeros((L + 1, widths.pop()), np.float32)
    for n, v in rows.items():
        arr[n + 1] = v
    return arr, hint


def load_any(
    path: str | os.PathLike,
    trait: Optional[str] = None,
    reduction: Optional[str] = None,
) -> PersonaVector:
    """Load a vector from an Orbax directory, a `.pt`, `.npy` or `.gguf` file.

    For files, trait and reduction come from a reference-style name
    (`{trait}_{reduction}_diff.pt`) unless given; `reduction` stays None when neither says.
    """
    path = Path(path)
    if path.is_dir():
        vec = load_vector(path)
        # replace() reruns __post_init__, so an override is validated like any other value
        return dataclasses.replace(vec, trait=trait or vec.trait,
                                   reduction=reduction or vec.reduction)
    if path.suffix == ".pt":
        arr = import_pt(path)
    elif path.suffix == ".npy":
        arr = import_npy(path)
    elif path.suffix == ".gguf":
        arr, hint = import_gguf(path)
        name_trait, name_reduction = parse_vector_filename(path)
        return PersonaVector(arr, trait=trait or name_trait, reduction=reduction or name_reduction,
                             model_id=hint, config={"source": str(path)})
    elif not path.exists():
        raise PersonaError(f"vector path {path} does not exist; check the path.")
    else:
        raise PersonaError(f"vector file {path} has an unknown type; use a .pt, .npy or .gguf file or "
                           "an Orbax directory written by save_vector.")
    name_trait, name_reduction = parse_vector_filename(path)
    return PersonaVector(arr, trait=trait or name_trait, reduction=reduction or name_reduction,
                         config={"source": str(path)})


SAVERS = {".pt": export_pt, ".npy": export_npy, ".gguf": export_gguf}  # by file suffix


def save_any(vec: PersonaVector | Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a vector by the path's type: `.pt` (the reference's tensor), `.npy`, `.gguf`
    (a llama.cpp control vector: rows 2..L only, see `export_gguf`), anything else an
    Orbax directory with metadata (`save_vector`). `load_any` reads each back as a
    `PersonaVector`; only the Orbax directory keeps trait, reduction and config.

    vec: a `PersonaVector` or a float [L+1, D] array (trait and reduction then come from
    a reference-style file name). An existing path is replaced only with `overwrite=True`.
    """
    path = Path(path)
    if not isinstance(vec, PersonaVector):
        trait, reduction = parse_vector_filename(path)
        vec = PersonaVector(np.asarray(vec), trait=trait, reduction=reduction)
    if path.suffix not in SAVERS:
        return save_vector(vec, path, overwrite=overwrite)
    if path.exists() and not overwrite:
        raise PersonaError(f"vector file {path} already exists; pass overwrite=True or choose another path.")
    if path.suffix == ".gguf":  # the model id travels as the file's model_hint
        return export_gguf(vec.array, path, vec.model_id)
    return SAVERS[path.suffix](vec.array, path)
