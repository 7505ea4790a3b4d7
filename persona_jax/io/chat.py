"""The one chat-rendering rule: the tokenizer's template, thinking off where it has it.

Templates that reject a system role (Gemma 2's raises "System role not supported"): the
system prompt is folded into the first user turn, `system + "\\n\\n" + user`, which is
what Gemma 3's own template does with one. The method's contrastive prompts live in the
system prompt, so a run should record that this happened: `folds_system_prompt(tokenizer)`
says whether it does (also `Model.folds_system_prompt`), and the first fold per template
logs a warning.
"""
from __future__ import annotations

import logging

from persona_jax.errors import PersonaError

SYSTEM_FOLD_SEPARATOR = "\n\n"


def _apply(tokenizer, template, messages, add_generation_prompt):
    # Qwen3: answer directly, as the method expects
    kwargs = {"enable_thinking": False} if "enable_thinking" in template else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def fold_system(messages) -> list[dict]:
    """System messages merged into the first user turn (`system\\n\\nuser`); a system prompt
    with no user turn after it becomes one."""
    system = [m["content"] for m in messages if m.get("role") == "system"]
    rest = [dict(m) for m in messages if m.get("role") != "system"]
    if not system:
        return rest
    prefix = SYSTEM_FOLD_SEPARATOR.join(system)
    for m in rest:
        if m.get("role") == "user":
            m["content"] = prefix + SYSTEM_FOLD_SEPARATOR + m["content"]
            return rest
    return [{"role": "user", "content": prefix}] + rest


_FOLDS: dict[str, bool] = {}
_WARNED: set[int] = set()


def folds_system_prompt(tokenizer) -> bool:
    """True when the tokenizer's chat template rejects a system message, so `render`
    folds system prompts into the first user turn."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = template if isinstance(template, str) else repr(template)
    if key not in _FOLDS:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            _apply(tokenizer, template, probe, True)
            _FOLDS[key] = False
        except Exception:  # noqa: BLE001 - jinja's TemplateError from the template's raise_exception
            try:
                _apply(tokenizer, template, fold_system(probe), True)
            except Exception:  # noqa: BLE001 - fails for another reason: not a system-role problem
                _FOLDS[key] = False
            else:
                _FOLDS[key] = True
    return _FOLDS[key]


def render(tokenizer, messages, add_generation_prompt: bool = True, where: str = "the model") -> str:
    """Chat template text for one conversation (list of {role, content})."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise PersonaError(
            f"the tokenizer of {where} has no chat template; pass already rendered prompt strings "
            "or pre-tokenized examples, or add a chat_template to tokenizer_config.json")
    has_system = any(m.get("role") == "system" for m in messages)
    if has_system and folds_system_prompt(tokenizer):
        if id(tokenizer) not in _WARNED:
            _WARNED.add(id(tokenizer))
            logging.warning("the chat template of %s rejects a system role: system prompts are folded "
                            "into the first user turn", where)
        messages = fold_system(messages)
    return _apply(tokenizer, template, messages, add_generation_prompt)
