"""CPU benchmark of capture, generation and steering sweeps: persona_jax vs transformers.

One command, everything measured side by side in one run on the same machine:

    python benchmarks/cpu_interventions.py            # full run (a few minutes on 2 cores)
    python benchmarks/cpu_interventions.py --quick    # smaller workloads, for development

A ~30M-parameter llama-shaped random model (hidden 512, 8 layers, 8 heads, MLP 1408,
vocab 8192, tied embeddings) is built with transformers, saved with a word-level
tokenizer (one token per word, so text and token counts agree), and loaded by
persona_jax in float32. Both sides see the same token ids. Throughput excludes
compilation (both sides are warmed up on the exact workload first); compile time is
reported separately. PyTorch is timed at the core count and at 1 thread, the faster
counting as the baseline. See benchmarks/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

# ----------------------------------------------------------------------------- workload
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
             max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

FULL = dict(cap_n=64, cap_prompt=(32, 96), cap_resp=(64, 192), cap_batch=16, ref_n=16,
            gen_batch=16, gen_prompt=(16, 64), gen_new=64,
            sweep_prompts=2, sweep_coefs=8, sweep_new=64,
            compile_layers=32, compile_width=256, repeats=3)
QUICK = dict(cap_n=16, cap_prompt=(32, 96), cap_resp=(64, 192), cap_batch=16, ref_n=4,
             gen_batch=16, gen_prompt=(16, 64), gen_new=16,
             sweep_prompts=2, sweep_coefs=8, sweep_new=16,
             compile_layers=32, compile_width=256, repeats=1)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def best_time(fn, repeats: int) -> float:
    """Minimum wall time of `repeats` calls (the function must block until done)."""
    return interleaved({"fn": fn}, repeats)["fn"]


def others_busy(seconds: float = 0.5) -> float:
    """Cores kept busy by other processes over the next `seconds` (this process sleeps),
    from /proc/stat; 0.0 where that file is missing."""
    def busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)  # (non-idle, total) jiffies
    try:
        b0, t0 = busy()
        time.sleep(seconds)
        b1, t1 = busy()
    except OSError:
        return 0.0
    return os.cpu_count() * (b1 - b0) / max(t1 - t0, 1)


def interleaved(fns: dict, repeats: int, verbose: bool = False) -> dict:
    """Minimum wall time of each function over `repeats` rounds, the functions taking
    turns within a round, so load from other processes hits every side alike.

    PyTorch thread-count variants (`torch_variants`, keys "name@Nt"): the multi-thread one
    runs only while other processes keep less than 0.3 of a core busy (PyTorch's OpenMP
    barriers stall for seconds per op when a core is taken; one such run can take
    minutes), and is dropped once it is 3x slower than its 1-thread sibling."""
    best = {k: float("inf") for k in fns}
    dropped = set()
    for r in range(repeats):
        for k, fn in fns.items():
            if k in dropped:
                continue
            if k.partition("@")[2] not in ("", "1t"):
                load = others_busy()
                if load > 0.3:
                    if verbose:
                        log(f"  round {r + 1}: {k} skipped, other processes busy ({load:.1f} cores)")
                    continue
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
            if verbose:
                log(f"  round {r + 1}: {k} {time.perf_counter() - t:.2f} s")
        for k in fns:
            base, _, threads = k.partition("@")
            sibling = [j for j in fns if j != k and j.partition("@")[0] == base and threads]
            if sibling and 3 * min(best[j] for j in sibling) < best[k] < float("inf"):
                dropped.add(k)
    return best


def torch_variants(name: str, fn) -> dict:
    """{name@Nt: fn with torch at N threads} for N = the core count and 1. On an idle
    machine N = cores is faster; when other processes hold cores, PyTorch's OpenMP
    barriers can make it many times slower than one thread, so the baseline is the
    faster of the two (never flattering persona_jax)."""
    import torch

    def with_threads(n):
        def run():
            old = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(old)
        return run

    counts = sorted({os.cpu_count(), 1}, reverse=True)
    return {f"{name}@{n}t": with_threads(n) for n in counts}


def baseline(times: dict, name: str) -> tuple[float, str]:
    """(best time, thread count label) over the torch_variants of `name`."""
    variants = {k: v for k, v in times.items() if k.partition("@")[0] == name and v < float("inf")}
    k = min(variants, key=variants.get)
    return variants[k], k.partition("@")[2]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model
def build_checkpoint(directory: str):
    """Random llama + word-level tokenizer saved to `directory`; returns the torch model."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), MODEL["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    fast.save_pretrained(directory)
    return model, fast


def word_texts(rng, n, lo, hi, prefix=""):
    """n texts of lo..hi random words (= tokens)."""
    lens = rng.randint(lo, hi + 1, size=n)
    return [prefix + " ".join(f"w{t}" for t in rng.randint(len(SPECIALS), MODEL["vocab_size"], size=k))
            for k in lens]


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token, LM head and embedding excluded."""
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return cfg.num_layers * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * f)


def capture_flops(cfg, lengths) -> float:
    """2 * matmul params * tokens + causal attention (QK^T and PV) on real tokens."""
    p = matmul_params(cfg)
    attn_width = cfg.num_heads * cfg.head_dim
    return sum(2.0 * p * t + cfg.num_layers * 2.0 * attn_width * t * (t + 1) for t in lengths)


# ----------------------------------------------------------------------------- sections
def matmul_probe():
    """A jitted float32 2048^3 jnp matmul: returns (run, flops); run blocks until done."""
    import jax
    import jax.numpy as jnp

    n = 2048
    rng = np.random.RandomState(0)
    a = jnp.asarray(rng.randn(n, n).astype(np.float32))
    b = jnp.asarray(rng.randn(n, n).astype(np.float32))
    f = jax.jit(lambda a, b: a @ b)
    run = lambda: f(a, b).block_until_ready()
    for _ in range(3):  # compile, page in, wake the thread pool
        run()
    return run, 2.0 * n ** 3


def bench_matmul(repeats: int) -> float:
    """float32 GFLOP/s of a large jnp matmul on this machine (the roofline for capture)."""
    run, flops = matmul_probe()
    return flops / best_time(run, max(10, repeats)) / 1e9


def bench_torch_matmul(repeats: int) -> float:
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = best_time(lambda: a @ b, max(5, repeats))
    return 2 * n ** 3 / t / 1e9


def bench_capture(w, model, torch_model, tok, rng):
    import torch
    from persona_jax.runtime.capture import capture

    prompts = word_texts(rng, w["cap_n"], *w["cap_prompt"])
    responses = word_texts(rng, w["cap_n"], *w["cap_resp"], prefix=" ")
    p_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    f_ids = [tok.encode(p + r, add_special_tokens=False) for p, r in zip(prompts, responses)]
    lengths = [len(x) for x in f_ids]
    tokens = sum(lengths)
    flops = capture_flops(model.config, lengths)

    # persona_jax: warm up (compiles every length bucket), then time
    run_ours = lambda: capture(model, prompts, responses, batch_size=w["cap_batch"])
    t = time.perf_counter()
    ours = run_ours()
    log(f"capture: persona_jax warm-up (compiles) {time.perf_counter() - t:.1f} s")

    # the reference procedure: one sample per forward, output_hidden_states, reductions in
    # torch; timed on an evenly spaced subset (ref_n samples) to keep the run short
    sub = list(range(0, len(f_ids), max(1, len(f_ids) // w["ref_n"])))[: w["ref_n"]]

    def reference():
        out = []
        with torch.no_grad():
            for i in sub:
                pl = len(p_ids[i])
                hs = torch_model(torch.tensor([f_ids[i]]), output_hidden_states=True).hidden_states
                hs = torch.stack(hs)[:, 0]  # [L+1, T, D]
                out.append(torch.stack([hs[:, :pl].mean(1), hs[:, pl - 1], hs[:, pl:].mean(1)]).numpy())
        return out

    t = time.perf_counter()
    ref = torch_variants("w", reference)["w@1t"]()  # warm-up, and the values to compare with
    log(f"capture: reference warm-up {time.perf_counter() - t:.1f} s")
    err = max(float(np.abs(ours[name][i] - ref[j][r]).max())
              for j, i in enumerate(sub) for r, name in enumerate(("prompt_avg", "prompt_last", "response_avg")))
    ref_lengths = [lengths[i] for i in sub]

    # batched transformers: length-sorted batches, right-padded, masked reductions in torch,
    # the base model only (no LM head), i.e. the best a careful PyTorch user would write
    order = np.argsort(lengths, kind="stable")
    bs = w["cap_batch"]

    def batched():
        with torch.no_grad():
            for s in range(0, len(order), bs):
                rows = order[s:s + bs]
                t = max(lengths[r] for r in rows)
                ids = torch.zeros((len(rows), t), dtype=torch.long)
                mask = torch.zeros((len(rows), t), dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, :lengths[r]] = torch.tensor(f_ids[r])
                    mask[j, :lengths[r]] = 1
                hs = torch.stack(torch_model.model(input_ids=ids, attention_mask=mask,
                                                   output_hidden_states=True).hidden_states)
                pos = torch.arange(t)[None]
                pl = torch.tensor([len(p_ids[r]) for r in rows])[:, None]
                tl = mask.sum(1, keepdim=True)
                wts = torch.stack([(pos < pl).float(), (pos == pl - 1).float(), ((pos >= pl) & (pos < tl)).float()])
                wts = wts / wts.sum(-1, keepdim=True)
                torch.einsum("rbt,lbtd->rbld", wts, hs).numpy()

    t = time.perf_counter()
    torch_variants("w", batched)["w@1t"]()
    log(f"capture: batched HF warm-up {time.perf_counter() - t:.1f} s")
    mm, mm_flops = matmul_probe()
    t = interleaved({"ours": run_ours, **torch_variants("ref", reference), **torch_variants("batched", batched),
                     "matmul": lambda: [mm() for _ in range(5)]}, w["repeats"], verbose=True)
    t_ours = t["ours"]
    (t_ref, ref_threads), (t_batched, batched_threads) = baseline(t, "ref"), baseline(t, "batched")
    return dict(matmul_gflops=5 * mm_flops / t["matmul"] / 1e9, tokens=tokens, flops=flops, t_ours=t_ours,
                t_ref=t_ref, ref_tokens=sum(ref_lengths), ref_flops=capture_flops(model.config, ref_lengths),
                t_batched=t_batched, max_err=err, ref_threads=ref_threads, batched_threads=batched_threads,
                n=len(prompts), padded=_padded_tokens(lengths, bs, model))


def _padded_tokens(lengths, bs, model):
    """Tokens persona_jax actually computes (length buckets and padding rows included)."""
    from persona_jax.runtime.capture import length_bucket

    order = sorted(lengths)
    total = 0
    for s in range(0, len(order), bs):
        total += length_bucket(max(order[s:s + bs])) * bs
    return total


def _hf_generate(torch_model, ids_list, max_new, hooks=(), **kwargs):
    import torch

    width = max(map(len, ids_list))
    ids = torch.zeros((len(ids_list), width), dtype=torch.long)
    mask = torch.zeros((len(ids_list), width), dtype=torch.long)
    for i, s in enumerate(ids_list):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    handles = [torch_model.model.layers[l - 1].register_forward_hook(fn) for l, fn in hooks]
    try:
        with torch.no_grad():
            out = torch_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                       min_new_tokens=max_new, pad_token_id=0, eos_token_id=2, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out[:, width:].tolist()


def _add_hook(v, coefs):
    import torch

    v = torch.tensor(v)
    c = torch.tensor(np.asarray(coefs, np.float32)).view(-1, 1, 1)

    def hook(module, args, out):
        if isinstance(out, tuple):
            return (out[0] + c * v,) + tuple(out[1:])
        return out + c * v

    return hook


def bench_generate(w, model, torch_model, tok, rng):
    from persona_jax.runtime.generate import generate
    from persona_jax.steering.spec import Steering

    b, new = w["gen_batch"], w["gen_new"]
    prompts = word_texts(rng, b, *w["gen_prompt"])
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    layer = model.num_layers // 2
    vec = rng.randn(model.num_layers + 1, model.hidden_size).astype(np.float32)
    coefs = list(np.linspace(-2, 2, b).astype(np.float32))
    steer = Steering(vec, layer=layer, coef=coefs, positions="all")
    rows = {}
    cases = {
        "greedy": (dict(temperature=0), dict(do_sample=False), ()),
        "greedy + steering": (dict(temperature=0, steering=steer), dict(do_sample=False),
                              ((layer, _add_hook(vec[layer], coefs)),)),
        "sampled (T=1, top-p 0.9)": (dict(temperature=1.0, top_p=0.9, seed=0),
                                     dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0), ()),
    }
    for name, (ours_kw, hf_kw, hooks) in cases.items():
        log(f"generate: {name}")
        run_ours = lambda: generate(model, prompts, new, min_new_tokens=new, batch_size=b, return_tokens=True,
                                    **ours_kw)
        g = run_ours()
        run_hf = lambda: _hf_generate(torch_model, ids, new, hooks=hooks, **hf_kw)
        hf = torch_variants("w", run_hf)["w@1t"]()
        t = interleaved({"ours": run_ours, **torch_variants("hf", run_hf)}, w["repeats"], verbose=True)
        t_ours, (t_hf, hf_threads) = t["ours"], baseline(t, "hf")
        assert all(len(t) == new for t in g.tokens)
        same = None
        if not hf_kw.get("do_sample"):
            same = float(np.mean([a == c for x, y in zip(g.tokens, hf) for a, c in zip(x, y)]))
        rows[name] = dict(t_ours=t_ours, t_hf=t_hf, tokens=b * new, same=same, hf_threads=hf_threads)
    return rows


def bench_sweep(w, model, torch_model, tok, rng):
    """An n_coefs-coefficient sweep on n_prompts prompts: one call (n_prompts*n_coefs rows,
    per-row coefficients) vs one call per coefficient (persona_jax and transformers hooks)."""
    from persona_jax.runtime.generate import generate
    from persona_jax.steering.spec import Steering

    k, n, new = w["sweep_coefs"], w["sweep_prompts"], w["sweep_new"]
    prompts = word_texts(rng, n, *w["gen_prompt"])
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    layer = model.num_layers // 2
    vec = rng.randn(model.num_layers + 1, model.hidden_size).astype(np.float32)
    coefs = [float(c) for c in np.linspace(0.25, 2.0, k)]
    inputs = [p for c in coefs for p in prompts]
    row_coefs = [c for c in coefs for _ in prompts]
    kw = dict(temperature=0, min_new_tokens=new, return_tokens=True)

    one = lambda: generate(model, inputs, new, batch_size=len(inputs),
                           steering=Steering(vec, layer=layer, coef=row_coefs), **kw).tokens
    seq = lambda: [generate(model, prompts, new, batch_size=n, steering=Steering(vec, layer=layer, coef=c),
                            **kw).tokens for c in coefs]
    hf_seq = lambda: [_hf_generate(torch_model, ids, new, hooks=((layer, _add_hook(vec[layer], [c] * n)),),
                                   do_sample=False) for c in coefs]
    a, s = one(), seq()
    same = a == [t for rows in s for t in rows]
    torch_variants("w", hf_seq)["w@1t"]()
    t = interleaved({"one": one, "seq": seq, **torch_variants("hf", hf_seq)}, w["repeats"], verbose=True)
    t_hf, hf_threads = baseline(t, "hf")
    return dict(t_one=t["one"], t_seq=t["seq"], t_hf=t_hf, hf_threads=hf_threads, same=same, rows=len(inputs))


def bench_compile(w):
    """Compile time (lower + XLA compile, no execution) of capture, forward and generate
    for a deep small-width config, and of the same width at 8 layers for comparison."""
    import jax
    import jax.numpy as jnp
    from persona_jax.runtime import apply
    from persona_jax.runtime.capture import capture_arrays
    from persona_jax.runtime.forward import forward_arrays
    from persona_jax.runtime.generate import SamplingParams, generate_arrays
    from persona_jax.model.config import DecoderConfig

    out = {}
    d = w["compile_width"]
    for layers in (8, w["compile_layers"]):
        cfg = DecoderConfig(model_type="llama", vocab_size=8192, hidden_size=d, intermediate_size=d * 11 // 4,
                            num_layers=layers, num_heads=4, num_kv_heads=4, head_dim=d // 4,
                            tie_word_embeddings=True, eos_token_ids=(2,), pad_token_id=0)
        t = time.perf_counter()
        params = jax.block_until_ready(apply.init_params(cfg, jax.random.PRNGKey(0)))
        t_init = time.perf_counter() - t
        b, s = 16, 256
        tok = jnp.zeros((b, s), jnp.int32)
        lens = jnp.full((b,), s, jnp.int32)
        row = {"init": t_init}
        t = time.perf_counter()
        capture_arrays.lower(cfg, params, tok, lens // 2, lens).compile()
        row["capture"] = time.perf_counter() - t
        t = time.perf_counter()
        forward_arrays.lower(cfg, params, tok, jnp.ones((b, s), jnp.int32)).compile()
        row["forward"] = time.perf_counter() - t
        sp = SamplingParams(max_new_tokens=64, greedy=True, use_top_k=False, use_top_p=False, eos_ids=(2,), pad_id=0)
        t = time.perf_counter()
        generate_arrays.lower(cfg, params, tok[:, :64], jnp.ones((b, 64), jnp.int32), jnp.zeros((b, 2), jnp.uint32),
                              jnp.float32(0), jnp.int32(0), jnp.float32(1), jnp.int32(1), sp=sp,
                              cache_len=128).compile()
        row["generate"] = time.perf_counter() - t
        out[layers] = row
    return out


# ----------------------------------------------------------------------------- report
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads (development)")
    parser.add_argument("--sections", default="capture,generate,sweep,compile",
                        help="comma-separated subset of: capture, generate, sweep, compile")
    parser.add_argument("--json", default=None, help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    w = QUICK if args.quick else FULL
    sections = set(args.sections.split(","))

    import torch

    torch.set_num_threads(os.cpu_count())
    import jax

    import persona_jax as pj

    raw = {"machine": machine(), "workload": w, "others_start": others_busy(1.0),
           "versions": f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"}
    print(f"machine: {raw['machine']}; {raw['versions']}; other processes busy: {raw['others_start']:.1f} cores",
          flush=True)
    rng = np.random.RandomState(0)
    with tempfile.TemporaryDirectory() as d:
        torch_model, tok = build_checkpoint(d)
        model = pj.load_model(d, dtype="float32")
        raw["params"] = sum(p.numel() for p in torch_model.parameters())
        raw["matmul_params"] = matmul_params(model.config)
        print(f"model: llama, {raw['params'] / 1e6:.1f}M params ({raw['matmul_params'] / 1e6:.1f}M in per-token "
              f"matmuls), hidden {model.hidden_size}, {model.num_layers} layers, vocab {model.config.vocab_size}, "
              "float32", flush=True)
        raw["matmul"] = dict(jax=bench_matmul(w["repeats"]), torch=bench_torch_matmul(w["repeats"]))
        print(f"float32 matmul (2048^3): jax {raw['matmul']['jax']:.0f} GFLOP/s, "
              f"torch {raw['matmul']['torch']:.0f} GFLOP/s", flush=True)
        for name, fn in (("capture", bench_capture), ("generate", bench_generate), ("sweep", bench_sweep)):
            if name in sections:
                t = time.perf_counter()
                raw[name] = fn(w, model, torch_model, tok, rng)
                print(f"{name} done ({time.perf_counter() - t:.0f} s)", flush=True)
    if "compile" in sections:
        raw["compile"] = bench_compile(w)
    raw["others_end"] = others_busy(1.0)
    report(raw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1, default=float)


def _row(figure, ours, base, ratio=None, target=None, minimum=None):
    met = "" if minimum is None else ("yes" if ratio >= minimum else "**no**")
    ratio_s = "" if ratio is None else (f"{ratio:.0%}" if target and target.endswith("%") else f"{ratio:.2f}x")
    print(f"| {figure} | {ours} | {base} | {ratio_s} | {target or ''} | {met} |")


def report(raw):
    w = raw["workload"]
    roof = max(raw["matmul"]["jax"], raw.get("capture", {}).get("matmul_gflops", 0.0))
    print()
    print(f"Machine: {raw['machine']}; {raw['versions']}; model {raw['params'] / 1e6:.1f}M params, float32.")
    print(f"Matmul roofline (jnp float32 2048^3, best of the run): {roof:.0f} GFLOP/s "
          f"(torch matmul: {raw['matmul']['torch']:.0f} GFLOP/s).")
    print()
    print("| figure | persona_jax | baseline | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    if "capture" in raw:
        c = raw["capture"]
        ours = c["tokens"] / c["t_ours"]
        ref = c["ref_tokens"] / c["t_ref"]
        bat = c["tokens"] / c["t_batched"]
        gflops = c["flops"] / c["t_ours"] / 1e9
        ref_gf = c["ref_flops"] / c["t_ref"] / 1e9
        bat_gf = c["flops"] / c["t_batched"] / 1e9
        _row("capture tokens/s vs reference (HF, 1 sample/forward)", f"{ours:,.0f}",
             f"{ref:,.0f} ({c['ref_threads']})", ours / ref, ">= 3x", 3)
        _row(f"capture tokens/s vs batched HF (batch {w['cap_batch']})", f"{ours:,.0f}",
             f"{bat:,.0f} ({c['batched_threads']})", ours / bat, ">= 2x", 2)
        _row("capture GFLOP/s vs matmul roofline", f"{gflops:.0f}", f"{roof:.0f}", gflops / roof, ">= 50%", 0.5)
        print(f"| (reference / batched HF GFLOP/s, share of roofline) | | {ref_gf:.0f} / {bat_gf:.0f} | "
              f"{ref_gf / roof:.0%} / {bat_gf / roof:.0%} | | |")
    if "generate" in raw:
        for name, g in raw["generate"].items():
            ours, hf = g["tokens"] / g["t_ours"], g["tokens"] / g["t_hf"]
            target = name == "greedy"
            _row(f"generate tokens/s, {name}, batch {w['gen_batch']} vs HF generate", f"{ours:,.0f}",
                 f"{hf:,.0f} ({g['hf_threads']})", ours / hf, ">= 3x" if target else None, 3 if target else None)
    if "sweep" in raw:
        s = raw["sweep"]
        k = w["sweep_coefs"]
        _row(f"{k}-coefficient sweep: one call vs {k} calls (persona_jax)", f"{s['t_one']:.2f} s",
             f"{s['t_seq']:.2f} s", s["t_seq"] / s["t_one"], ">= 3x", 3)
        _row(f"{k}-coefficient sweep: one call vs {k} calls (HF + hook)", f"{s['t_one']:.2f} s",
             f"{s['t_hf']:.2f} s ({s['hf_threads']})", s["t_hf"] / s["t_one"])
    if "compile" in raw:
        deepest = max(raw["compile"])
        for layers, r in raw["compile"].items():
            worst = max(r["capture"], r["forward"], r["generate"])
            deep = layers == deepest
            print(f"| compile s, {layers} layers x {w['compile_width']} wide: capture / forward / generate | "
                  f"{r['capture']:.1f} / {r['forward']:.1f} / {r['generate']:.1f} | | | {'< 60 s' if deep else ''} | "
                  f"{('yes' if worst < 60 else '**no**') if deep else ''} |")
    print()
    if "capture" in raw:
        c = raw["capture"]
        print(f"capture: {c['n']} samples, {c['tokens']} real tokens ({c['padded']} computed incl. length-bucket "
              f"padding: {c['tokens'] / c['padded']:.0%} useful); reference timed on {c['ref_tokens']} tokens; "
              f"max |persona_jax - reference| = {c['max_err']:.1e}")
    if "generate" in raw:
        g = raw["generate"]
        print(f"generate: {w['gen_batch']} prompts of {w['gen_prompt'][0]}-{w['gen_prompt'][1]} tokens, "
              f"{w['gen_new']} new tokens each (EOS suppressed on both sides); greedy tokens equal to HF: "
              f"{g['greedy']['same']:.0%}; steered: {g['greedy + steering']['same']:.0%}")
    if "sweep" in raw:
        s = raw["sweep"]
        print(f"sweep: {w['sweep_prompts']} prompts x {w['sweep_coefs']} coefficients = {s['rows']} rows, "
              f"{w['sweep_new']} new tokens; rows equal the separate calls: {s['same']}")
    if "compile" in raw:
        print("compile: lower + XLA compile, no execution; param init " +
              ", ".join(f"{r['init']:.1f} s ({k} layers)" for k, r in raw["compile"].items()))
    busy = max(raw["others_start"], raw["others_end"])
    print(f"other processes kept {raw['others_start']:.1f} cores busy at the start, {raw['others_end']:.1f} at the end"
          + (": the machine was shared, figures are noisy (see the README)" if busy > 0.3 else " (idle machine)"))


if __name__ == "__main__":
    sys.exit(main())
