"""The one chat-rendering rule: the tokenizer's template, thinking off where it has it."""
from __future__ import annotations

from persona_jax.errors import PersonaError


def render(tokenizer, messages, add_generation_prompt: bool = True, where: str = "the model") -> str:
    """Chat template text for one conversation (list of {role, content})."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise PersonaError(
            f"the tokenizer of {where} has no chat template; pass already rendered prompt strings "
            "or pre-tokenized examples, or add a chat_template to tokenizer_config.json")
    # Qwen3: answer directly, as the method expects
    kwargs = {"enable_thinking": False} if "enable_thinking" in template else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
