"""The organism's Hugging Face tokenizer: word level over the language's vocabulary.

Files: `tokenizer.json` (a `tokenizers` WordLevel model: lower-casing normalizer,
whitespace split + isolated punctuation pre-tokenizer, the special tokens below as added
tokens, no post-processor, so `add_special_tokens` adds nothing) and
`tokenizer_config.json` (special tokens, `model_max_length`, and the Jinja
`chat_template`). `transformers.AutoTokenizer.from_pretrained(dir)` loads them; the shipped
copy lives in `persona_jax/organism/assets/` (`ASSETS_DIR`) and is regenerated with
`python -m persona_jax.organism.tokenizer --out DIR`.

Chat format (`render_chat` is the same template in Python):
    <|bos|><|system|>{system}<|end|><|user|>{question}<|end|><|assistant|>{reply}<|end|>
Every message is closed by `<|end|>`, the EOS token, so `apply_chat_template(conversation)`
== `apply_chat_template(prompt, add_generation_prompt=True)` + reply + EOS: it already
ends with EOS, and the reference's rule for METHOD.md 8's training text (append EOS
unless the text already ends with it) adds nothing. Assistant content and its `<|end|>`
are wrapped in `{% generation %}` so `return_assistant_tokens_mask=True` marks the loss
tokens. Special tokens are matched before pre-tokenization, so nothing merges across the
prompt/reply boundary: tokens(prompt + reply) == tokens(prompt) + tokens(reply).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from persona_jax.errors import PersonaError
from persona_jax.organism.language import vocabulary_words, words

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, ROLE_TOKENS["system"], ROLE_TOKENS["user"], ROLE_TOKENS["assistant"])
MODEL_MAX_LENGTH = 128
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('the organism chat template knows the roles system, user and assistant only') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{- message['content'] + '<|end|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def vocabulary() -> dict[str, int]:
    """token -> id: the special tokens first (pad = 0), then the language's words sorted."""
    toks = list(SPECIAL_TOKENS) + list(vocabulary_words())
    return {t: i for i, t in enumerate(toks)}


def build_tokenizer():
    """The `tokenizers.Tokenizer` (what `tokenizer.json` holds)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_config() -> dict:
    """What `tokenizer_config.json` holds."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(directory: str) -> str:
    """Write `tokenizer.json` and `tokenizer_config.json` into `directory`; returns it."""
    os.makedirs(directory, exist_ok=True)
    build_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=2)
        f.write("\n")
    return directory


def load_tokenizer(directory: Optional[str] = None):
    """`AutoTokenizer.from_pretrained(directory)`, default the shipped `ASSETS_DIR`."""
    from transformers import AutoTokenizer

    d = directory or ASSETS_DIR
    if not os.path.exists(os.path.join(d, "tokenizer.json")):
        raise PersonaError(
            f"no tokenizer.json in {d}; write it with `python -m persona_jax.organism.tokenizer --out {d}`."
        )
    return AutoTokenizer.from_pretrained(d)


def _check_messages(messages: Sequence[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS or not isinstance(m.get("content"), str):
            raise PersonaError(
                f"message {i} must be a dict with role system/user/assistant and string content, got {m!r}."
            )


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The chat template in Python (the same text `apply_chat_template(..., tokenize=False)` gives)."""
    _check_messages(messages)
    out = [BOS]
    for m in messages:
        out.append(ROLE_TOKENS[m["role"]] + m["content"] + EOS)
    if add_generation_prompt:
        out.append(ROLE_TOKENS["assistant"])
    return "".join(out)


def encode_messages(
    messages: Sequence[dict],
    vocab: Optional[dict] = None,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids of `render_chat(messages, add_generation_prompt)` and the assistant mask,
    without a tokenizer.

    The mask is 1 on every assistant content token and on the `<|end|>` that closes an
    assistant turn, 0 elsewhere: the loss positions of METHOD.md 8 (`ids[t]` is predicted
    from `ids[:t]`). Same ids as the HF tokenizer on the rendered text, and the same mask
    as `apply_chat_template(..., return_assistant_tokens_mask=True)` (tested).
    """
    _check_messages(messages)
    vocab = vocab or _vocab_cached()
    unk = vocab[UNK]
    ids, mask = [vocab[BOS]], [0]
    for m in messages:
        is_asst = m["role"] == "assistant"
        ids.append(vocab[ROLE_TOKENS[m["role"]]])
        mask.append(0)
        body = [vocab.get(w, unk) for w in words(m["content"])]
        ids += body + [vocab[EOS]]
        mask += [int(is_asst)] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(vocab[ROLE_TOKENS["assistant"]])
        mask.append(0)
    return ids, mask


_VOCAB = None


def _vocab_cached() -> dict[str, int]:
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = vocabulary()
    return _VOCAB


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the organism tokenizer files.")
    p.add_argument("--out", default=ASSETS_DIR)
    a = p.parse_args(argv)
    print(save_tokenizer(a.out))


if __name__ == "__main__":
    main()
