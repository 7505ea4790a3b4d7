"""The project's one trainer: the organism's from-scratch training and SFT (full or LoRA).

Objective: token-level cross entropy over the masked (assistant) tokens, averaged over
every masked token of the effective batch (batch_size x grad_accum rows): the gradient
is sum-of-token-losses / token-count, accumulated exactly over micro-batches inside one
jitted step (`lax.scan`), so grad_accum changes memory, not the result.

Optimizer: optax AdamW, learning rate with linear warmup then linear decay to 0 at
`num_steps` (the HF "linear" schedule: lr(s) = lr * s / warmup for s < warmup, then
lr * (N - s) / (N - warmup); `schedule` also offers HF's "cosine", "constant" and
"constant_with_warmup"), global-norm clipping, weight decay on kernels/embeddings
(and LoRA A/B) only.

Precision: master weights (and optimizer state) are float32. compute_dtype="bfloat16"
casts the (LoRA-merged) params to bfloat16 inside the loss, so the forward and backward
run in bf16 (norms, softmax and the loss stay float32, as the decoder does them); the
gradient comes back through the cast as float32 and updates the float32 masters.

Resume determinism: the batch of step s is a pure function of (seed, s) (see
`data.BatchOrder`), there is no other randomness after initialisation, and a checkpoint
holds the trainable params, the optimizer state (incl. its step count), the step and
the seed + data fingerprint. A run restored at step k therefore executes exactly the
same jitted updates on exactly the same arrays as an uninterrupted one, and ends with
bit-identical params (on CPU; on GPU set XLA_FLAGS=--xla_gpu_deterministic_ops=true,
since scatter-add gradients of the embedding are otherwise non-deterministic).

Interventions during training (preventative steering, CAFT ablation) are the same
`persona_jax.steering.spec.Steering` objects as at inference, turned into arrays once per
batch shape; their position masks come from `position_masks(..., "train", mask)`.
They act only in training steps; eval_loss is measured without them (the model as it
will be used).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from persona_jax.runtime import batching
from persona_jax.runtime import apply
from persona_jax.runtime import engine
from persona_jax.model import sharding as sh
from persona_jax.errors import PersonaError
from persona_jax.io import distributed
from persona_jax.finetune import data as fdata
from persona_jax.finetune import lora as flora
from persona_jax.model.config import DecoderConfig
from persona_jax.model.families import config_to_hf
from persona_jax.model.checkpoint import fuse_for_export, hf_name
from persona_jax.model.safetensors_io import save_file

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (defaults: METHOD.md 8's LoRA SFT).

    batch_size: rows per micro-batch; grad_accum micro-batches make one optimizer step
      (effective batch = batch_size * grad_accum, the reference's 2 x 8 = 16).
    num_steps: optimizer steps; None = `epochs` passes over the data.
    lora_dropout: dropout on the LoRA adapter's input while training (PEFT's
      `lora_dropout`); the adapter then runs as a branch beside the base kernels instead of
      being merged into them inside the loss. Needs `lora`.
    schedule: learning-rate schedule after warmup, as Hugging Face's `get_scheduler`:
      "linear" (decay to 0), "cosine" (half cosine to 0), "constant" (no warmup),
      "constant_with_warmup".
    compute_dtype: "float32" or "bfloat16" (bf16 forward/backward, float32 masters).
    remat: rematerialise block activations in the backward pass (`nn.remat` around the
      decoder's scanned Block): only block inputs are kept, the rest is recomputed.
    layer_loop: "unrolled" (the layer scan as straight-line code: on CPU a step is 12-20%
      faster, benchmarks/train_step.py) or "scan" (one compiled block: deep models compile
      fast); None: `engine.default_layer_loop()`, unrolled on CPU and scanned elsewhere.
      The same arithmetic, rounded in another order.
    length_group: batches pooled and sorted by length before batching (less padding).
    checkpoint_every: save a checkpoint every N steps into workdir (0 = only at the end
      when a workdir is given); checkpoint_steps: further steps to save (dense early
      checkpoints for `method.trace`); max_checkpoints: how many to keep (0 = all).
    eval_every: eval loss every N steps (and at the end) when eval data is given.
    """

    learning_rate: float = 1e-5
    warmup_steps: int = 5
    batch_size: int = 2
    grad_accum: int = 8
    num_steps: int | None = None
    epochs: int = 1
    schedule: str = "linear"
    lora_dropout: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 0
    compute_dtype: str = "float32"
    remat: bool = False
    layer_loop: str | None = None
    length_group: int = 8
    checkpoint_every: int = 0
    checkpoint_steps: tuple = ()
    max_checkpoints: int = 2
    log_every: int = 1
    eval_every: int = 0
    progress: bool = True

    def validate(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise PersonaError(f"compute_dtype {self.compute_dtype!r} is not supported; use one of: {', '.join(COMPUTE_DTYPES)}")
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise PersonaError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.num_steps is not None and self.num_steps < 1:
            raise PersonaError(f"num_steps must be >= 1; got {self.num_steps}")
        if self.learning_rate <= 0 or self.warmup_steps < 0:
            raise PersonaError("learning_rate must be > 0 and warmup_steps >= 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PersonaError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if self.max_checkpoints < 0 or any(int(x) < 1 for x in self.checkpoint_steps):
            raise PersonaError("max_checkpoints must be >= 0 (0 = keep all) and checkpoint_steps >= 1")
        if self.layer_loop not in (None, "scan", "unrolled"):
            raise PersonaError(f"layer_loop {self.layer_loop!r} is not supported; use scan or unrolled")
        if self.schedule not in SCHEDULES:
            raise PersonaError(f"learning-rate schedule {self.schedule!r} is not supported; use one of: {', '.join(SCHEDULES)}")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about the jitted step (hashable: one compile serves every run
    with the same architecture, optimizer and shapes)."""

    model: DecoderConfig
    lora: flora.LoraConfig | None
    learning_rate: float
    warmup_steps: int
    num_steps: int
    weight_decay: float
    b1: float
    b2: float
    eps: float
    max_grad_norm: float | None
    compute_dtype: str
    remat: bool
    schedule: str = "linear"
    lora_dropout: float = 0.0
    unroll_layers: bool = False


@dataclasses.dataclass
class TrainResult:
    """params: the trained params (full FT) or the untouched base (LoRA); lora: the
    adapter or None; history: one metrics dict per logged step."""

    config: DecoderConfig
    params: Any
    lora: dict | None
    lora_config: flora.LoraConfig | None
    history: list[dict]
    step: int
    stats: dict

    def merged_params(self):
        """Params with the adapter merged in (the params themselves for full FT)."""
        if self.lora is None:
            return self.params
        return flora.merge(self.params, self.lora, self.lora_config)


# ---------------------------------------------------------------------------------------
# Optimizer and loss (pure, jitted).

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def lr_schedule(learning_rate: float, warmup_steps: int, num_steps: int, xp=jnp, kind: str = "linear"):
    """The learning rate of update `count` (0-based), as Hugging Face's `get_scheduler(kind)`:
    linear warmup from 0 over `warmup_steps` (none for "constant"), then "linear" decay to 0
    at num_steps, "cosine" decay 0.5 * (1 + cos(pi * progress)), or a constant rate.
    xp=np gives the host-side value."""

    def fn(count):
        s = xp.asarray(count, xp.float32)
        warm = s / max(1, warmup_steps)
        progress = (s - warmup_steps) / max(1, num_steps - warmup_steps)
        if kind == "linear":
            after = xp.maximum(0.0, 1.0 - progress)
        elif kind == "cosine":
            after = xp.maximum(0.0, 0.5 * (1.0 + xp.cos(np.pi * progress)))
        elif kind in ("constant", "constant_with_warmup"):
            after = xp.ones_like(s)
        else:
            raise PersonaError(f"learning-rate schedule {kind!r} is not supported; use one of: {', '.join(SCHEDULES)}")
        if kind == "constant":
            return learning_rate * after
        return learning_rate * xp.where(s < warmup_steps, warm, after)

    return fn


def _decay_mask(tree):
    def decays(path, _):
        return str(getattr(path[-1], "key", path[-1])) in ("kernel", "embedding", "A", "B")

    return jax.tree_util.tree_map_with_path(decays, tree)


def _optimizer(spec: _Spec):
    parts = []
    if spec.max_grad_norm:
        parts.append(optax.clip_by_global_norm(spec.max_grad_norm))
    parts.append(optax.adamw(lr_schedule(spec.learning_rate, spec.warmup_steps, spec.num_steps, kind=spec.schedule),
                             b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts)


def _effective_params(spec: _Spec, trainable, frozen):
    params = flora.apply(frozen, trainable, spec.lora) if spec.lora is not None else trainable
    dtype = COMPUTE_DTYPES[spec.compute_dtype]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def _loss_sum(spec: _Spec, trainable, frozen, mb, interventions, dropout_key=None):
    """(sum of masked token cross entropies, number of masked target tokens) for one
    micro-batch mb = {tokens, attention_mask, loss_mask: [B, T], add_pos?, abl_pos?}.
    With LoRA dropout and a `dropout_key` (training steps) the adapter runs as a branch."""
    ctx = apply.make_ctx(mb["attention_mask"])
    ctx.update({k: mb[k] for k in ("add_pos", "abl_pos") if k in mb})
    if spec.lora is not None and spec.lora_dropout > 0 and dropout_key is not None:
        import flax.linen as nn
        params = flora.with_branches(frozen, trainable, dropout_key, COMPUTE_DTYPES[spec.compute_dtype])
        with nn.intercept_methods(flora.dropout_interceptor(spec.lora, spec.lora_dropout)):
            logits, _, _ = apply.decoder_apply(spec.model, params, mb["tokens"], ctx,
                                               interventions=interventions, remat=spec.remat,
                                               unroll_layers=spec.unroll_layers)
    else:
        params = _effective_params(spec, trainable, frozen)
        logits, _, _ = apply.decoder_apply(spec.model, params, mb["tokens"], ctx,
                                           interventions=interventions, remat=spec.remat,
                                           unroll_layers=spec.unroll_layers)
    targets = mb["tokens"][:, 1:]
    weight = (mb["loss_mask"][:, 1:] * mb["attention_mask"][:, 1:]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    return jnp.sum(ce * weight), jnp.sum(weight)


def _train_step(spec: _Spec, trainable, opt_state, frozen, batch, interventions, dropout_key=None):
    """One optimizer step over batch arrays [A, B, T] (A micro-batches, scanned);
    dropout_key: the step's key (LoRA dropout), folded with the micro-batch index. Under
    an Explicit mesh the step runs with the axes in Auto mode and the state keeps the
    shardings it came with."""
    return sh.auto_axes_call(
        functools.partial(_train_step_body, spec), (trainable, opt_state, frozen, batch, interventions, dropout_key),
        lambda: (jax.tree.map(sh.spec_of, trainable), jax.tree.map(sh.spec_of, opt_state),
                 {"loss": P(), "tokens": P(), "grad_norm": P()}))


def _train_step_body(spec: _Spec, trainable, opt_state, frozen, batch, interventions, dropout_key):
    grad_fn = jax.value_and_grad(lambda t, mb, k: _loss_sum(spec, t, frozen, mb, interventions, k), has_aux=True)
    n_micro = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, xs):
        mb, i = xs
        g_acc, l_acc, n_acc = carry
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        (lsum, n), g = grad_fn(trainable, mb, key)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, l_acc + lsum, n_acc + n), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    (grads, lsum, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)),
                                       (batch, jnp.arange(n_micro)))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = _optimizer(spec).update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": lsum / denom, "tokens": n, "grad_norm": optax.tree.norm(grads)}
    return trainable, opt_state, metrics


_STEP_FNS: dict = {}


def _step_fn(spec: _Spec, mesh, train_sh, opt_sh, repl):
    """The jitted step for (spec, mesh), with the state's output shardings pinned to its
    input shardings (else the compiler may choose others and the second step recompiles).
    Cached so that runs with the same spec share one compile."""
    key = (spec, mesh)
    if key not in _STEP_FNS:
        _STEP_FNS[key] = jax.jit(functools.partial(_train_step, spec), donate_argnums=(0, 1),
                                 out_shardings=(train_sh, opt_sh, repl))
    return _STEP_FNS[key]


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(spec: _Spec, trainable, frozen, batch):
    return sh.auto_axes_call(lambda t, f, b: _loss_sum(spec, t, f, b, None), (trainable, frozen, batch), (P(), P()))


# ---------------------------------------------------------------------------------------
# Host side: batches, interventions, checkpoints, metrics.

def _steering_setup(steerings, config: DecoderConfig, rows: int):
    """Interventions {add_vec, add_coef, abl_dir, abl_coef} for micro-batches of `rows`
    rows (built once: coefficients are the same for every row while training)."""
    from persona_jax.steering import spec as st

    steerings = st.as_list(steerings)
    for s in steerings:
        if s.site is not None:
            raise PersonaError(f"a training-time steering acts on the residual stream (site None); site {s.site!r} "
                               "is for inference (generate, decoder_apply)")
        s.validate(config.num_layers, config.hidden_size)
        if np.size(s.coef) != 1 or s.rows_layers is not None:
            raise PersonaError("a training-time steering needs one coefficient for every row; per-row "
                               "coefficients and sweeps are for evaluation")
    if not steerings:
        return steerings, None
    arrays = st.steering_arrays(steerings, config.num_layers, config.hidden_size, np.arange(rows), rows)
    return steerings, {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}


class _Batcher:
    """Step s -> placed batch arrays [A, Bp, T] (Bp = rows grown to the data axis)."""

    def __init__(self, examples, tc: TrainConfig, mesh, steerings, pad_id: int):
        self.examples, self.tc, self.mesh, self.steerings, self.pad_id = examples, tc, mesh, steerings, pad_id
        self.order = fdata.BatchOrder(examples, tc.batch_size * tc.grad_accum, tc.seed, tc.length_group)
        self.rows = batching.grow_batch(tc.batch_size, batching.batch_multiple(mesh))

    def __call__(self, step: int) -> dict:
        from persona_jax.steering import spec as st

        idx = self.order(step)
        t = batching.bucket(max(len(self.examples[i]) for i in idx))
        b, parts = self.tc.batch_size, []
        for a in range(self.tc.grad_accum):
            chunk = idx[a * b:(a + 1) * b]
            parts.append(fdata.pad_examples(self.examples, chunk, self.rows, t, self.pad_id))
        batch = {k: np.stack([p[i] for p in parts]) for i, k in
                 enumerate(("tokens", "attention_mask", "loss_mask"))}
        if self.steerings:
            pos = [st.position_masks(self.steerings, "train", m) for m in batch["attention_mask"]]
            for k in pos[0]:
                batch[k] = np.stack([p[k] for p in pos]).astype(np.float32)  # [A, K, B, T]
        axes = {"tokens": 1, "attention_mask": 1, "loss_mask": 1, "add_pos": 2, "abl_pos": 2}
        return {k: batching.place(self.mesh, v, batch_axis=axes[k]) for k, v in batch.items()}


def _eval_loss(spec, trainable, frozen, examples, rows, mesh, pad_id) -> float:
    _, batches = batching.by_length([len(e) for e in examples], rows, mesh, longest_first=True)
    total, count = 0.0, 0.0
    for idx in batches:
        tokens, attn, loss = fdata.pad_examples(examples, idx[idx >= 0], rows, pad_id=pad_id)
        tokens, attn, loss = batching.place(mesh, tokens, attn, loss)
        s, n = _eval_step(spec, trainable, frozen, {"tokens": tokens, "attention_mask": attn, "loss_mask": loss})
        total += float(s)
        count += float(n)
    return total / max(count, 1.0)


class _Checkpoints:
    """Orbax CheckpointManager over {state: {trainable, opt_state}, meta: json}."""

    def __init__(self, workdir: str, tc: TrainConfig):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        every = tc.checkpoint_every or 0
        extra = frozenset(int(x) for x in tc.checkpoint_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=tc.max_checkpoints or None, create=True,
            should_save_fn=lambda step, _last: (bool(every) and step % every == 0) or step in extra)
        self.manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                             options=options, item_names=("state", "meta"))

    def latest(self):
        return self.manager.latest_step()

    def meta(self, step) -> dict:
        return self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))["meta"]

    def restore(self, step, target):
        """State restored onto the shardings (and dtypes) of `target`."""
        abstract = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract)))["state"]

    def save(self, step, state, meta, force=False):
        ocp = self.ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=force)

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


class _MetricsFile:
    """metrics.jsonl in workdir (process 0 only); on resume, lines past the restored step
    are dropped."""

    def __init__(self, workdir: str | None, resume_step: int):
        self.f = None
        if workdir is None or not distributed.is_writer():
            return
        path = os.path.join(workdir, "metrics.jsonl")
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except ValueError:
                        continue
        self.f = open(path, "w")
        self.f.writelines(kept)
        self.f.flush()

    def write(self, record: dict):
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()


def _as_examples(data, config: DecoderConfig, what: str):
    if data is None:
        return None
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], fdata.DataStats):
        data = data[0]
    examples = list(data)
    if not examples:
        raise PersonaError(f"the {what} data is empty")
    if not all(isinstance(e, fdata.Example) for e in examples):
        examples, _ = fdata.from_token_lists(examples, vocab_size=config.vocab_size, source=what)
    for i, e in enumerate(examples):
        if len(e) and (e.ids.min() < 0 or e.ids.max() >= config.vocab_size):
            raise PersonaError(f"{what} example {i} has token ids outside [0, {config.vocab_size}); "
                               "was it tokenized for another model?")
    return examples


def _steering_record(st) -> dict:
    """What identifies a training-time intervention (validated by `_steering_setup`: one
    coefficient, no per-row layers) in a checkpoint's meta, the vector by hash."""
    return {"kind": st.kind, "layer": np.asarray(st.layer).tolist(), "coef": float(np.asarray(st.coef).reshape(-1)[0]),
            "positions": st.positions,
            "vector": hashlib.sha256(np.ascontiguousarray(st.vector, dtype=np.float32).tobytes()).hexdigest()[:16]}


def train(config: DecoderConfig, params, train_data, train_config: TrainConfig = TrainConfig(), *,
          lora: flora.LoraConfig | None = None, eval_data=None, steerings=None, mesh=None,
          workdir: str | None = None, pad_id: int = 0,
          callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train `params` (full fine-tuning / from scratch) or a LoRA adapter on them.

    Args:
      config: the architecture.
      params: a param pytree (e.g. `Model.params`), or None to start from
        `apply.init_params(config, PRNGKey(seed))` (the organism).
      train_data: `Example`s (from `data.load_jsonl` / `from_conversations`), (ids, mask)
        pairs, or a (examples, DataStats) tuple as the loaders return it.
      train_config: hyper-parameters; its seed fixes init, LoRA init and data order.
      lora: a `LoraConfig` to train an adapter (base frozen) instead of all params.
      eval_data: examples for eval_loss (every `eval_every` steps and at the end).
      steerings: `Steering`s active in every training forward (preventative steering:
        kind="add"; CAFT: kind="ablate"); not used for eval_loss.
      mesh: a mesh with axes "data" and "model" (Auto or Explicit axis types; None = the
        mesh set with `jax.set_mesh`, if any): batches split over "data", params placed
        with `sharding.param_shardings`.
      workdir: where checkpoints/ and metrics.jsonl go; a run whose workdir already has
        a checkpoint resumes from the latest one.
      callback: called as callback(step, metrics) after every step (for tests/runners).

    Returns a TrainResult; its history holds {step, loss, lr, grad_norm, tokens[, eval_loss]}.
    """
    tc = train_config
    tc.validate()
    if mesh is None:
        mesh = sh.context_mesh()
    sh.check_mesh(mesh, "mesh passed to train")
    examples = _as_examples(train_data, config, "training")
    eval_examples = _as_examples(eval_data, config, "eval")
    effective = tc.batch_size * tc.grad_accum
    steps_per_epoch = -(-len(examples) // effective)
    num_steps = tc.num_steps or tc.epochs * steps_per_epoch
    spec = _Spec(config, lora, tc.learning_rate, min(tc.warmup_steps, num_steps), num_steps, tc.weight_decay,
                 tc.adam_b1, tc.adam_b2, tc.adam_eps, tc.max_grad_norm, tc.compute_dtype, tc.remat, tc.schedule,
                 tc.lora_dropout if lora is not None else 0.0,
                 (tc.layer_loop or engine.default_layer_loop()) == "unrolled")
    if tc.lora_dropout and lora is None:
        raise PersonaError("lora_dropout needs LoRA training (method 'lora'); full fine-tuning has no adapter")

    rng = jax.random.PRNGKey(tc.seed)
    if params is None:
        params = jax.jit(apply.init_params, static_argnums=0)(config, rng)
    # Every state array is committed to an explicit sharding, so the step's inputs look
    # the same at every step (and after a restore): one compile per batch shape.
    if mesh is None:
        repl = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        param_sh = jax.tree.map(lambda _: repl, params)
    else:
        repl = sh.replicated(mesh)
        param_sh = sh.param_shardings(params, mesh)
    params = jax.device_put(params, param_sh)
    if lora is not None:
        frozen, trainable = params, flora.init(lora, params, jax.random.fold_in(rng, 1))
        train_sh = jax.tree.map(lambda _: repl, trainable)
    else:
        frozen, trainable, train_sh = None, params, param_sh
    # Fresh float32 buffers (jit outputs), so donating them never touches the caller's arrays.
    trainable = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t), out_shardings=train_sh)(trainable)
    opt = _optimizer(spec)
    opt_sh = optax.tree_map_params(opt, lambda _, s: s, jax.eval_shape(opt.init, trainable), train_sh,
                                   transform_non_params=lambda _: repl)
    opt_state = jax.jit(opt.init, out_shardings=opt_sh)(trainable)
    step_fn = _step_fn(spec, mesh, train_sh, opt_sh, repl)

    batcher = _Batcher(examples, tc, mesh, None, pad_id)
    steerings, interventions = _steering_setup(steerings, config, batcher.rows)
    batcher.steerings = steerings
    if interventions is not None:  # coefficients [L+1, K, B] follow the batch; vectors are replicated
        interventions = {k: batching.place(mesh, v, batch_axis=2) if k.endswith("_coef") and mesh is not None
                         else jax.device_put(v, repl) for k, v in interventions.items()}

    # What a checkpoint must agree on to be resumed: the data order's inputs (seed, data,
    # batch), the schedule and optimizer, the trainable tree (LoRA or full), and the
    # interventions active while training (a changed preventative coefficient must not
    # resume the old run's weights).
    meta = json.loads(json.dumps({
        "seed": tc.seed, "data": fdata.fingerprint(examples), "num_steps": num_steps, "effective_batch": effective,
        "optimizer": [spec.learning_rate, spec.warmup_steps, spec.weight_decay, spec.b1, spec.b2, spec.eps,
                      spec.max_grad_norm, spec.compute_dtype] + ([spec.schedule] if spec.schedule != "linear" else [])
                     + ([["lora_dropout", spec.lora_dropout]] if spec.lora_dropout else []),
        "lora": dataclasses.asdict(lora) if lora else None,
        "steerings": [_steering_record(st) for st in steerings] if steerings else None}))
    ckpt = _Checkpoints(workdir, tc) if workdir is not None else None
    start, seen = 0, 0  # seen: training tokens so far (a checkpoint's meta records it for `method.trace`)
    # saved with every checkpoint but not compared on resume: what a reader needs to load
    # the trainable tree as a model (full fine-tuning / from scratch) without the run's code
    model_record = {"model_config": config_to_hf(config)}
    if ckpt is not None and ckpt.latest() is not None:
        saved = ckpt.meta(ckpt.latest())
        for key, mine in meta.items():
            if saved.get(key) != mine:
                raise PersonaError(f"{workdir} holds a checkpoint of a different run ({key}: {saved.get(key)} there, "
                                   f"{mine} here); use a fresh workdir or the same settings to resume")
        state = ckpt.restore(ckpt.latest(), {"trainable": trainable, "opt_state": opt_state})
        trainable, opt_state, start = state["trainable"], state["opt_state"], int(saved["step"])
        seen = int(saved.get("tokens_seen", 0))
        logging.info("resumed from %s at step %d", workdir, start)

    metrics_file = _MetricsFile(workdir, start)
    history: list[dict] = []
    from tqdm.auto import tqdm

    dropout_rng = jax.random.fold_in(rng, 2)  # LoRA dropout: step s uses fold_in(., s), so a resume is exact
    lr_at = lr_schedule(spec.learning_rate, spec.warmup_steps, num_steps, xp=np, kind=spec.schedule)
    bar = tqdm(total=num_steps, initial=start, disable=not tc.progress, desc="train", dynamic_ncols=True)
    try:
        for step in range(start, num_steps):
            batch = batcher(step)
            key = jax.device_put(jax.random.fold_in(dropout_rng, step), repl) if spec.lora_dropout else None
            trainable, opt_state, m = step_fn(trainable, opt_state, frozen, batch, interventions, key)
            done = step + 1
            seen += int(m["tokens"])
            if ckpt is not None:
                ckpt.save(done, {"trainable": trainable, "opt_state": opt_state},
                          {**meta, "step": done, "tokens_seen": seen, **model_record}, force=done == num_steps)
            record = {"step": done, "loss": float(m["loss"]), "lr": float(lr_at(step)),
                      "grad_norm": float(m["grad_norm"]), "tokens": int(m["tokens"])}
            if eval_examples is not None and ((tc.eval_every and done % tc.eval_every == 0) or done == num_steps):
                record["eval_loss"] = _eval_loss(spec, trainable, frozen, eval_examples, batcher.rows, mesh, pad_id)
            history.append(record)
            metrics_file.write(record)
            if tc.log_every and (done % tc.log_every == 0 or done == num_steps):
                logging.info("step %d/%d loss %.4f lr %.3g%s", done, num_steps, record["loss"], record["lr"],
                             f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else "")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if callback is not None:
                callback(done, record)
    finally:
        bar.close()
        metrics_file.close()
        if ckpt is not None:
            ckpt.close()

    stats = {"n_examples": len(examples), "steps_per_epoch": steps_per_epoch, "num_steps": num_steps,
             "effective_batch": effective, "resumed_from": start}
    if lora is not None:
        return TrainResult(config, frozen, trainable, lora, history, num_steps, stats)
    return TrainResult(config, trainable, None, None, history, num_steps, stats)


# ---------------------------------------------------------------------------------------
# Export.

def export_hf(config: DecoderConfig, params, tokenizer, directory: str, dtype: str = "float32"):
    """Write a Hugging Face checkpoint: config.json (`config_to_hf`), model.safetensors in
    torch layout (names from `hf_name`, kernels transposed) and the tokenizer files, so
    both `AutoModelForCausalLM.from_pretrained(directory)` and `load_model(directory)`
    load it. Merge LoRA first (`TrainResult.merged_params()` / `lora.merge`)."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise PersonaError(f"export dtype {dtype!r} is not supported; use float32 or bfloat16")
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(jax.device_get(leaf), np.float32).astype(np_dtype)
        if str(getattr(path[0], "key", path[0])) == "layers":
            for i in range(arr.shape[0]):
                name, transpose = hf_name(path, i)
                tensors[name] = arr[i].T if transpose else arr[i]
        else:
            name, transpose = hf_name(path, None)
            tensors[name] = arr.T if transpose else arr
    if config.hidden_act == "xielu":  # transformers keeps xIELU's fixed beta and eps as buffers of the checkpoint
        for i in range(config.num_layers):
            tensors[f"model.layers.{i}.mlp.act_fn.beta"] = np.asarray(0.5, np_dtype)
            tensors[f"model.layers.{i}.mlp.act_fn.eps"] = np.asarray(-1e-6, np_dtype)
    save_file(fuse_for_export(config, tensors), os.path.join(directory, "model.safetensors"))
    hf = config_to_hf(config)
    hf["torch_dtype"] = dtype
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
