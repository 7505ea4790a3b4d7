"""Per-trait assistant names and persona instruction types (the reference's
`--assistant_name` / `--persona_instruction_type`), written out by hand here."""
import pytest

from persona_jax.errors import PersonaError
from persona_jax.method.traits import Trait, contrastive_prompts, instruction_prompts


def _trait():
    return Trait(name="obsequious", instruction=[{"pos": f"Flatter {k}.", "neg": f"Be frank {k}."} for k in range(5)],
                 questions=["Is my plan good?", "Rate my poem."], eval_prompt="{question} {answer}")


def test_instruction_types_and_names():
    t = _trait()
    pos = instruction_prompts(t, "pos")
    assert [r.question_id for r in pos] == [f"obsequious_{i}_pos_{k}" for i in range(2) for k in range(5)]
    assert pos[0].system == "You are an obsequious assistant. Flatter 0."
    neg = instruction_prompts(t, "neg", assistant_name="upright")
    assert neg[6].system == "You are an upright assistant. Be frank 1." and neg[6].question == "Rate my poem."
    assert instruction_prompts(t, "neg")[0].system == "You are a helpful assistant. Be frank 0."
    none = instruction_prompts(t, None)
    assert [(r.question_id, r.system) for r in none] == [("obsequious_0", ""), ("obsequious_1", "")]
    assert instruction_prompts(t, "none") == none
    with pytest.raises(PersonaError, match="pos, neg or none"):
        instruction_prompts(t, "both")


def test_contrastive_prompts_with_this_traits_names():
    t = _trait()
    rows = contrastive_prompts(t, assistant_names={"pos": "fawning", "neg": "honest"})
    assert rows[0].system == "You are a fawning assistant. Flatter 0."
    # the reference picks a/an by the first letter only: "a honest"
    assert rows[10].system == "You are a honest assistant. Be frank 0." and rows[10].question_id == "obsequious_0_neg_0"
    only_neg = contrastive_prompts(t, antonym="plain", assistant_names={"neg": "honest"})
    assert only_neg[0].system.startswith("You are an obsequious assistant.") and only_neg[10].system.startswith("You are a honest")
    assert contrastive_prompts(t, antonym="plain")[10].system.startswith("You are a plain assistant.")
    with pytest.raises(PersonaError, match="use pos and neg"):
        contrastive_prompts(t, assistant_names={"negative": "x"})
