"""Load a checkpoint and show what persona_jax sees in it.

python -m experiments.inspect_model --model=DIR [--dtype=float32] [--prompt=TEXT]

Prints the architecture summary and the parameter count; with --prompt, renders the
prompt as one user turn with the tokenizer's chat template (generation prompt added) and
prints the five most likely next tokens.
"""
from absl import flags

from persona_jax.pipeline import cli
from persona_jax.errors import PersonaError

_MODEL = flags.DEFINE_string("model", None, "checkpoint directory (config.json, *.safetensors, tokenizer) or hub id in the local cache")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 or bfloat16")
_PROMPT = flags.DEFINE_string("prompt", None, "optional user message: print the top-5 next tokens after it")
_TOP_K = 5


def summary(model) -> str:
    import jax
    c = model.config
    n_params = sum(int(x.size) for x in jax.tree.leaves(model.params))
    rope = c.rope_type if c.rope_type == "default" else f"{c.rope_type} x{c.rope_factor:g}"
    windows = sorted(set(c.layer_windows) - {0})
    lines = [
        f"model: {model.name}",
        f"family: {c.model_type}",
        f"layers: {c.num_layers}  hidden: {c.hidden_size}  intermediate: {c.intermediate_size}  vocab: {c.vocab_size}",
        f"heads: {c.num_heads}  kv heads: {c.num_kv_heads}  head dim: {c.head_dim}",
        f"rope: {rope} (theta {c.rope_theta:g})  qkv bias: {c.qkv_bias}  q/k norm: {c.qk_norm}  "
        f"tied embeddings: {c.tie_word_embeddings}  sliding window: {windows[0] if windows else 'none'}",
        f"dtype: {model.dtype}",
        f"parameters: {n_params:,}",
        f"hidden states per token: {c.num_layers + 1} x {c.hidden_size}",
        f"tokenizer: {'none' if model.tokenizer is None else type(model.tokenizer).__name__}"
        + ("" if model.tokenizer is None else f"  chat template: {'yes' if getattr(model.tokenizer, 'chat_template', None) else 'no'}"),
    ]
    return "\n".join(lines)


def top_next_tokens(model, prompt: str, k: int = _TOP_K):
    """[(token_id, token_text, probability)] for the k most likely tokens after the
    chat-rendered prompt."""
    import jax
    import numpy as np

    import persona_jax as pj

    text = model.render_chat([{"role": "user", "content": prompt}])
    ids = model.require_tokenizer()(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PersonaError("the rendered prompt has no tokens")
    logits = np.asarray(pj.forward(model, np.asarray([ids]), None).logits[0, -1], np.float64)
    probs = np.asarray(jax.nn.softmax(logits))
    top = np.argsort(-probs)[:k]
    return text, [(int(i), model.tokenizer.decode([int(i)]), float(probs[i])) for i in top]


def main(argv):
    if len(argv) > 1:
        raise PersonaError(f"unexpected arguments {' '.join(argv[1:])}; pass everything as --flags")
    if not _MODEL.value:
        raise PersonaError("--model is required: a checkpoint directory with config.json and *.safetensors")
    import persona_jax as pj

    model = pj.load_model(_MODEL.value, dtype=_DTYPE.value)
    print(summary(model))
    if _PROMPT.value is not None:
        text, top = top_next_tokens(model, _PROMPT.value)
        print(f"prompt (chat template applied): {text!r}")
        print(f"top-{len(top)} next tokens:")
        for i, tok, p in top:
            print(f"  {i:>8d}  {tok!r:<20} {p:.4f}")


if __name__ == "__main__":
    cli.run(main)
