"""Evaluate any model on a trait's questions, optionally steered: the reference's
`eval/eval_persona.py`.

python -m experiments.eval_persona --model=DIR_OR_ADAPTER_OR_HUB_ID --trait=evil \
    --trait_dir=data_generation --output_path=eval/evil.csv \
    [--vector=evil_response_avg_diff.pt --layers=20 --coefs=0,1,2 --steering_type=response] \
    [--persona_instruction_type=pos --assistant_name=evil] [--version=eval] [--n_per_question=10]

--model takes a Hugging Face model directory, a hub id already in the HF cache (offline),
a PEFT LoRA adapter directory (merged into its base model on load; --base_model overrides
the adapter's base_model_name_or_path), or a training output directory (its latest
checkpoint-N, or this project's merged/ / adapter/ export).

Writes the judged CSV (`question, prompt, answer, question_id[, layer, coef], <trait>,
coherence`: the reference's columns; `layer` and `coef` only when steering) and, beside
it, `<name>_per_question.csv` with the mean scores of every question (per layer and
coefficient when steering) and `<name>_summary.json`. Sampling at temperature 1 (greedy
with --n_per_question=1), top-p 1, as the reference. An existing output resumes (rows
already generated or judged are kept); --overwrite starts it afresh. Every file is written
by process 0 only.
"""
import types

from absl import flags

from persona_jax.pipeline import cli

_MODEL = flags.DEFINE_string("model", None, "model dir, hub id in the HF cache, LoRA adapter dir, or training output dir")
_BASE = flags.DEFINE_string("base_model", None, "base model of a LoRA adapter (default: its base_model_name_or_path)")
_TRAIT = flags.DEFINE_string("trait", None, "trait name (its JSON under trait_dir)")
_TRAIT_DIR = flags.DEFINE_string("trait_dir", "data_generation", "holds trait_data_extract/ and trait_data_eval/")
_VERSION = flags.DEFINE_enum("version", "eval", ["eval", "extract"], "which question file: trait_data_{version}/")
_OUTPUT = flags.DEFINE_string("output_path", None, "judged CSV to write")
_VECTOR = flags.DEFINE_string("vector", None, "steering vector (.pt / .npy / Orbax dir), [L+1, D]; none: no steering")
_LAYERS = flags.DEFINE_list("layers", None, "hidden-state indices to steer at (one run per layer)")
_COEFS = flags.DEFINE_list("coefs", ["0"], "steering coefficients (one run per coefficient)")
_INCREMENTAL = flags.DEFINE_boolean("incremental", False, "steer every --layers layer at once with the increments "
                                    "v[l] - v[l-1] (the paper's appendix J.3): one run per coefficient, "
                                    "its layer column the layers joined by '+'")
_STEERING_TYPE = flags.DEFINE_enum("steering_type", "response", ["response", "prompt", "all"],
                                   "positions steered (METHOD.md 6)")
_INSTRUCTION = flags.DEFINE_enum("persona_instruction_type", "none", ["none", "pos", "neg"],
                                 "system prompt from the trait's pos or neg instructions, or none")
_ASSISTANT = flags.DEFINE_string("assistant_name", None, "name in 'You are a/an NAME assistant.' "
                                 "(default: the trait for pos, 'helpful' for neg)")
_N = flags.DEFINE_integer("n_per_question", 10, "samples per question (and instruction)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 1000, "new tokens at most per answer")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "sampling temperature (0 when n_per_question is 1)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_BATCH = flags.DEFINE_integer("batch_size", 64, "generation batch size")
_JUDGE = flags.DEFINE_enum("judge", "openai", ["openai", "local"], "judge kind")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "gpt-4.1-mini-2025-04-14", "judge model name (openai)")
_JUDGE_URL = flags.DEFINE_string("judge_base_url", "", "OpenAI-compatible endpoint (empty: api.openai.com)")
_JUDGE_KEY = flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "environment variable with the API key")
_JUDGE_LOCAL = flags.DEFINE_string("judge_local_model", "", "judge=local: checkpoint of the judging model")
_AGGREGATION = flags.DEFINE_enum("aggregation", "0_100", ["0_100", "0_10", "binary"], "trait score aggregation")
_CONCURRENCY = flags.DEFINE_integer("max_concurrent_judges", 32, "judge requests in flight")
_JUDGE_TIMEOUT = flags.DEFINE_float("judge_timeout", 60.0, "seconds per judge request before it is retried")
_JUDGE_RETRIES = flags.DEFINE_integer("judge_max_retries", 6, "retries per judge request before the run stops")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "start the output afresh instead of resuming it")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "float32 | bfloat16")
_MESH_DATA = flags.DEFINE_integer("mesh_data", -1, "devices on the batch axis (-1: all the model axis leaves)")
_MESH_MODEL = flags.DEFINE_integer("mesh_model", 1, "tensor-parallel width")
_DISTRIBUTED = flags.DEFINE_boolean("distributed", False, "multi-host: call jax.distributed.initialize() first")
_SCAN_DECODE = flags.DEFINE_boolean("scan_decode", False, "decode holding the weights once (slower)")
flags.mark_flags_as_required(["model", "trait", "output_path"])


def _numbers(values, cast, what):
    from persona_jax.errors import PersonaError
    try:
        return [cast(x) for x in values]
    except ValueError:
        raise PersonaError(f"--{what} must be numbers; got {','.join(values)}") from None


def per_question_means(rows, trait: str, keys=("question_id", "layer", "coef")) -> list[dict]:
    """One row per question (and layer, coef): n, mean trait and coherence over scored rows."""
    from persona_jax.io.csvio import parse_score
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k, "") for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        rec = {k: v for k, v in zip(keys, key) if k in rs[0]}
        rec["question"] = rs[0]["question"]
        rec["n"] = len(rs)
        for col in (trait, "coherence"):
            vals = [v for v in (parse_score(r.get(col)) for r in rs) if v is not None]
            rec[col] = sum(vals) / len(vals) if vals else None
            rec[f"{col}_n_scored"] = len(vals)
        out.append(rec)
    return out


def main(argv):
    del argv
    import os

    import numpy as np

    from persona_jax.errors import PersonaError
    from persona_jax.finetune.resolve import load_any_model
    from persona_jax.io.csvio import read_csv, write_csv_atomic
    from persona_jax.io.reports import write_json
    from persona_jax.io.vectors import check_vector_shape, load_any
    from persona_jax.judges.base import judge_csv
    from persona_jax.method import traits as tr
    from persona_jax.method.responses import Sampling, Spec, generate_to_csv, scores
    from persona_jax.method.steer_eval import conversation
    from persona_jax.model.sharding import maybe_initialize_distributed
    from persona_jax.pipeline import setup as runner
    from persona_jax.steering.spec import Steering, incremental_steering

    # --- everything a user can get wrong is checked before the model loads -------------
    trait_file = tr.trait_paths(_TRAIT_DIR.value, _TRAIT.value)[0 if _VERSION.value == "extract" else 1]
    trait = tr.load_trait(trait_file, name=_TRAIT.value)
    instruction = None if _INSTRUCTION.value == "none" else _INSTRUCTION.value
    rows_spec = tr.instruction_prompts(trait, instruction, _ASSISTANT.value)
    coefs = _numbers(_COEFS.value, float, "coefs")
    vector = None
    if _VECTOR.value:
        if not _LAYERS.value:
            raise PersonaError("--vector needs --layers (the hidden-state indices to steer at)")
        vector = load_any(_VECTOR.value).array
        layers = _numbers(_LAYERS.value, int, "layers")
    elif _LAYERS.value or _INCREMENTAL.value or any(c != 0 for c in coefs):
        raise PersonaError("--layers, --incremental and nonzero --coefs need --vector (the steering vector)")
    if _N.value < 1:
        raise PersonaError(f"--n_per_question must be >= 1; got {_N.value}")
    out_path = _OUTPUT.value
    stem = os.path.splitext(out_path)[0]
    judge_cfg = types.SimpleNamespace(kind=_JUDGE.value, model=_JUDGE_MODEL.value, base_url=_JUDGE_URL.value,
                                      api_key_env=_JUDGE_KEY.value, aggregation=_AGGREGATION.value,
                                      max_concurrency=_CONCURRENCY.value, local_model=_JUDGE_LOCAL.value,
                                      local_dtype=_DTYPE.value, timeout=_JUDGE_TIMEOUT.value,
                                      max_retries=_JUDGE_RETRIES.value)

    maybe_initialize_distributed(_DISTRIBUTED.value)
    mesh = runner.mesh_from(types.SimpleNamespace(mesh=types.SimpleNamespace(data=_MESH_DATA.value,
                                                                             model=_MESH_MODEL.value)))
    model = load_any_model(_MODEL.value, dtype=_DTYPE.value, mesh=mesh, scan_decode=_SCAN_DECODE.value,
                           base_model=_BASE.value)
    if vector is not None:
        check_vector_shape(vector, model.num_layers, model.hidden_size, _VECTOR.value)
        for l in layers:
            if not 0 <= l <= model.num_layers:
                raise PersonaError(f"--layers {l} is outside 0..{model.num_layers} for this model")
        grid = ([("+".join(str(l) for l in sorted(set(layers))), c) for c in coefs] if _INCREMENTAL.value
                else [(l, c) for l in layers for c in coefs])
    else:
        grid = [None]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    judge = runner.make_judge(judge_cfg, os.path.dirname(os.path.abspath(out_path)))

    specs = []
    for cell in grid:
        extra = {} if cell is None else {"layer": str(cell[0]), "coef": repr(float(cell[1]))}
        for row in rows_spec:
            prompt = model.render_chat(conversation(row.question, row.system or None))
            specs += [Spec(row.question, prompt, row.question_id, dict(extra)) for _ in range(_N.value)]

    def steering_for(chunk):
        if _INCREMENTAL.value:
            return [incremental_steering(vector, layers, [float(s.extra["coef"]) for s in chunk],
                                         positions=_STEERING_TYPE.value)]
        return [Steering.sweep(vector, [int(s.extra["layer"]) for s in chunk], [float(s.extra["coef"]) for s in chunk],
                               positions=_STEERING_TYPE.value)]

    if _OVERWRITE.value and os.path.exists(out_path):
        from persona_jax.io.distributed import writer_only
        writer_only(os.remove)(out_path)
    temperature = 0.0 if _N.value == 1 else _TEMPERATURE.value
    sampling = Sampling(max_new_tokens=_MAX_TOKENS.value, temperature=temperature, top_p=_TOP_P.value,
                        seed=_SEED.value, batch_size=_BATCH.value, chunk_size=max(_BATCH.value * 4, 1))
    generate_to_csv(model, specs, out_path, trait.name, sampling, steering_for if vector is not None else None,
                    progress=True)
    judge_csv(judge, out_path, trait.name, trait.eval_prompt)

    _, rows = read_csv(out_path)
    keys = ("question_id",) if vector is None else ("question_id", "layer", "coef")
    means = per_question_means(rows, trait.name, keys)
    cols = [*keys, "question", "n", trait.name, f"{trait.name}_n_scored", "coherence", "coherence_n_scored"]
    write_csv_atomic(f"{stem}_per_question.csv", cols, means)
    summary = {"model": _MODEL.value, "trait": trait.name, "version": _VERSION.value, "rows": len(rows),
               "persona_instruction_type": _INSTRUCTION.value, "vector": _VECTOR.value, "cells": []}
    for cell in grid:
        sel = rows if cell is None else [r for r in rows if r["layer"] == str(cell[0]) and float(r["coef"]) == cell[1]]
        rec = {} if cell is None else {"layer": cell[0], "coef": cell[1]}
        for col in (trait.name, "coherence"):
            vals = np.asarray([v for v in scores(sel, col, out_path) if v is not None], float)
            rec[col] = float(vals.mean()) if vals.size else None
            rec[f"{col}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else None
        summary["cells"].append(rec)
        where = "" if cell is None else f"layer {cell[0]} coef {cell[1]:g}: "
        print(where + "  ".join(f"{c}: {rec[c]:.2f} +- {rec[c + '_std'] or 0:.2f}" if rec[c] is not None
                                 else f"{c}: n/a" for c in (trait.name, "coherence")))
    write_json(f"{stem}_summary.json", summary)
    print(out_path)


if __name__ == "__main__":
    cli.run(main)
