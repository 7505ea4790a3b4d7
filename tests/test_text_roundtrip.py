"""Nothing a model emits breaks a file (issue 15 point 2).

A tiny llama with a byte-level BPE vocabulary (the 256 byte tokens of GPT-2's alphabet,
no merges) samples answers that hold every byte, so NUL, lone CRs, control characters,
U+2028 and the replacement characters of partial UTF-8 sequences. Every such string must
come back unchanged from our response CSVs and JSONL, and equal from pandas (the
reference's reader), with `unescape_cell` for the one escaped character (NUL).
"""
import csv
import json
import os

import numpy as np
import pandas as pd
import pytest

import persona_jax as pj
from persona_jax.io import csvio, jsonl
from persona_jax.io.csvio import read_csv, response_columns, unescape_cell, write_csv_atomic
from persona_jax.method import extract as ex
from persona_jax.testing import CHAT_TEMPLATE, SPECIALS, tiny_checkpoint

TRAIT = "evil"


def byte_tokenizer():
    """GPT-2-style byte-level BPE: ids 0..5 the chat specials, 6..261 one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_of(ch):
    """GPT-2's bytes_to_unicode inverse: the byte a ByteLevel alphabet character stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[ch]


BYTE0 = len(SPECIALS)  # id of byte 0


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bytellama"))
    tiny_checkpoint(d, "llama", vocab_size=BYTE0 + 256, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    byte_tokenizer().save_pretrained(d)
    return pj.load_model(d)


@pytest.fixture(scope="module")
def answers(byte_model):
    """Sampled answers (EOS forbidden, hotter than 1 so every byte turns up), the decodes of
    every single byte token, every byte at once, and a 100k-character reply."""
    tok = byte_model.require_tokenizer()
    gen = pj.generate(byte_model, ["<|user|>say anything<|end|><|assistant|>"] * 16, max_new_tokens=160,
                      temperature=4.0, min_new_tokens=160, seed=3, return_tokens=True, batch_size=16)
    emitted = {t - BYTE0 for seq in gen.tokens for t in seq if t >= BYTE0}
    assert emitted == set(range(256)), f"bytes never sampled: {sorted(set(range(256)) - emitted)}"
    singles = [tok.decode([BYTE0 + b]) for b in range(256)]
    assert singles[0] == "\0" and singles[13] == "\r" and singles[0x80] == "\ufffd"  # partial UTF-8
    everything = tok.decode([BYTE0 + b for b in range(256)])
    lsep = tok.decode([BYTE0 + b for b in "a\u2028b\u2400c\u24000".encode()])
    rng = np.random.default_rng(0)
    long = tok.decode((BYTE0 + rng.integers(0, 256, 60_000)).tolist()) * 2
    long = long[:100_000] if len(long) >= 100_000 else long + "x" * (100_000 - len(long))
    out = list(gen.texts) + singles + [everything, lsep, "\r", "\r\n", "", "\u2400", "\u24000", "\0\0", long]
    assert any("\r" in a and "\r\n" not in a for a in gen.texts) and "\u2028" in lsep and len(long) == 100_000
    return out


def _rows(answers, side):
    return [{"question": f"q{i % 5}?", "prompt": f"<|system|>be {side}<|end|><|user|>q{i % 5}?<|end|><|assistant|>",
             "answer": a, "question_id": f"{TRAIT}_{i % 5}_{side}_0", TRAIT: 90.0 if side == "pos" else 10.0,
             "coherence": 80.0} for i, a in enumerate(answers)]


def test_csv_round_trip_ours_and_pandas(answers, tmp_path):
    path = tmp_path / "evil_pos_instruct.csv"
    cols = response_columns(TRAIT)
    write_csv_atomic(path, cols, _rows(answers, "pos"))
    _, back = read_csv(path, required=cols)
    assert len(back) == len(answers) and [r["answer"] for r in back] == answers
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert len(df) == len(answers)
    assert [unescape_cell(a) for a in df["answer"]] == answers
    assert all("\0" not in a for a in df["answer"])  # NUL only ever escaped on disk
    # the score columns read as numbers with pandas' defaults, as the reference reads them
    df2 = pd.read_csv(path)
    assert len(df2) == len(answers) and float(df2[TRAIT].mean()) == 90.0


def test_pandas_written_csv_reads_back(answers, tmp_path):
    """The other way: a frame pandas writes (escaped and quoted as the docs say) reads back
    equal with ours."""
    path = tmp_path / "ref.csv"
    frame = pd.DataFrame(_rows(answers, "neg"))
    frame["answer"] = frame["answer"].map(csvio.escape_cell)
    frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    _, back = read_csv(path)
    assert [r["answer"] for r in back] == answers
    # pandas' default writer (the reference's) leaves a lone CR unquoted, which splits the
    # row for every reader; our writer quotes it
    raw = pd.DataFrame({"answer": ["a\rb", "c"]})
    raw.to_csv(tmp_path / "raw.csv", index=False)
    assert len(pd.read_csv(tmp_path / "raw.csv")) == 3
    write_csv_atomic(tmp_path / "ours.csv", ["answer"], [{"answer": "a\rb"}, {"answer": "c"}])
    assert len(pd.read_csv(tmp_path / "ours.csv", keep_default_na=False)) == 2
    assert [r["answer"] for r in read_csv(tmp_path / "ours.csv")[1]] == ["a\rb", "c"]


def test_files_without_special_characters_are_unchanged(tmp_path):
    rows = [{"answer": 'plain, "quoted"\nnew line', "n": 1.5}]
    write_csv_atomic(tmp_path / "a.csv", ["answer", "n"], rows)
    pd.DataFrame(rows).to_csv(tmp_path / "b.csv", index=False)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_escape_is_lossless_both_ways():
    for s in ["", "\0", "\u2400", "\u24000", "\u2400\0", "\0\u2400", "\u2400\u2400", "a\0b\u2400c0", "\u24001\u2400"]:
        e = csvio.escape_cell(s)
        assert "\0" not in e and unescape_cell(e) == s
    assert unescape_cell(float("nan")) != unescape_cell(float("nan"))  # NaN passes through


def test_extraction_rows_stay_aligned(byte_model, answers, tmp_path):
    """The issue's failure: a lone CR in a sampled answer split its CSV row, so extraction
    found pos and neg CSVs of different lengths."""
    pos, neg = tmp_path / "evil_pos_instruct.csv", tmp_path / "evil_neg_instruct.csv"
    short = answers[:16] + answers[16 + 13: 16 + 14]  # the sampled answers and a lone "\r" reply
    write_csv_atomic(pos, response_columns(TRAIT), _rows(short, "pos"))
    write_csv_atomic(neg, response_columns(TRAIT), _rows(short[::-1], "neg"))
    vecs, stats = ex.vectors_from_csvs(byte_model, str(pos), str(neg), TRAIT, batch_size=8, progress=False)
    assert stats["n_pairs"] == len(short) == stats["n_kept"]
    assert vecs["response_avg"].shape == (byte_model.num_layers + 1, byte_model.hidden_size)


def test_generate_to_csv_real_path(byte_model, tmp_path):
    from persona_jax.method.responses import Sampling, Spec, generate_to_csv

    prompt = "<|user|>hi<|end|><|assistant|>"
    specs = [Spec("hi", prompt, f"{TRAIT}_0_pos_{i}") for i in range(8)]
    path = tmp_path / "gen.csv"
    rows = generate_to_csv(byte_model, specs, str(path), TRAIT,
                           Sampling(max_new_tokens=96, min_new_tokens=96, temperature=4.0, batch_size=8, chunk_size=4),
                           progress=False)
    _, back = read_csv(path)
    assert [r["answer"] for r in back] == [r["answer"] for r in rows] and len(back) == 8
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert [unescape_cell(a) for a in df["answer"]] == [r["answer"] for r in rows]


def test_jsonl_round_trip_ours_and_pandas(answers, tmp_path):
    from persona_jax.finetune import data as fdata
    from persona_jax.method.projection import read_jsonl_conversations

    records = [{"messages": [{"role": "user", "content": f"q{i}\u2028?"}, {"role": "assistant", "content": a}],
                "label": i % 2} for i, a in enumerate(answers) if a.strip()]
    path = tmp_path / "train.jsonl"
    jsonl.write_jsonl(path, records)
    assert read_jsonl_conversations(str(path)) == records
    assert [m for _, m in fdata.read_conversations(str(path))] == [r["messages"] for r in records]
    # the reference reads its JSONL with json.loads per line; pandas splits lines on "\n"
    with open(path, encoding="utf-8", newline="") as f:
        assert [json.loads(line) for line in f.read().split("\n") if line] == records
    df = pd.read_json(path, lines=True)
    assert [m[-1]["content"] for m in df["messages"]] == [r["messages"][-1]["content"] for r in records]
    # universal-newline readers and str.splitlines would split these lines: ours does not
    assert len(path.read_text(encoding="utf-8").splitlines()) > len(records)
    # Windows line ends and a byte-order mark are accepted
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert read_jsonl_conversations(str(crlf)) == records


def test_jsonl_errors_name_the_line(tmp_path):
    from persona_jax.errors import PersonaError

    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n\n{"x": 1}\n')
    with pytest.raises(PersonaError, match=r"line 3 has no \"messages\""):
        jsonl.read_conversations(p)
    p.write_bytes(b'{"messages": "\xff"}\n')
    with pytest.raises(PersonaError, match="line 1 is not valid UTF-8"):
        jsonl.read_conversations(p)
    with pytest.raises(PersonaError, match="does not exist"):
        jsonl.read_conversations(tmp_path / "none.jsonl")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
