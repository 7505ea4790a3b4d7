"""Reference response CSVs: pandas-compatible bytes, column checks, atomic rewrite."""
import pytest

from persona_jax.io.csvio import (
    check_columns,
    format_score,
    parse_score,
    read_csv,
    response_columns,
    write_csv_atomic,
)
from persona_jax.errors import PersonaError


def test_write_matches_pandas_to_csv_bytes(tmp_path):
    cols = response_columns("evil")
    assert cols == ["question", "prompt", "answer", "question_id", "evil", "coherence"]
    rows = [
        {"question": "q1", "prompt": "<|im_start|>user\nq1", "answer": 'a,b\n"c"',
         "question_id": "evil_0_pos_0", "evil": 87.5, "coherence": None},
        {"question": "ü?", "prompt": "p", "answer": "", "question_id": "evil_1_pos_0",
         "evil": 0.1 + 0.2, "coherence": 100.0},
    ]
    path = tmp_path / "evil_pos_instruct.csv"
    write_csv_atomic(path, cols, rows)
    # what pandas' df.to_csv(path, index=False) writes for the same frame (NaN -> empty)
    want = ('question,prompt,answer,question_id,evil,coherence\n'
            'q1,"<|im_start|>user\nq1","a,b\n""c""",evil_0_pos_0,87.5,\n'
            'ü?,p,,evil_1_pos_0,0.30000000000000004,100.0\n')
    assert path.read_bytes() == want.encode("utf-8")
    fields, back = read_csv(path, required=cols)
    assert fields == cols
    assert back[0]["answer"] == 'a,b\n"c"' and back[0]["coherence"] == ""
    assert parse_score(back[1]["evil"]) == 0.1 + 0.2
    assert [p.name for p in tmp_path.iterdir()] == ["evil_pos_instruct.csv"]


def test_missing_columns_named(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(PersonaError) as e:
        read_csv(path, required=response_columns("evil"))
    msg = str(e.value)
    assert "prompt, question_id, evil, coherence" in msg and str(path) in msg
    assert "\n" not in msg
    check_columns(["a", "b"], ["b"], "here")
    with pytest.raises(PersonaError, match="is missing column"):
        check_columns(["a"], ["b"], "here")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PersonaError, match="does not exist"):
        read_csv(tmp_path / "none.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(PersonaError, match="empty"):
        read_csv(tmp_path / "e.csv")


def test_short_rows_read_as_empty_cells(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("question,answer,evil\nq,a\n")
    _, rows = read_csv(path)
    assert rows == [{"question": "q", "answer": "a", "evil": ""}]


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "r.csv"
    write_csv_atomic(path, ["a"], [{"a": 1}])
    before = path.read_bytes()

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_csv_atomic(path, ["a"], rows())
    assert path.read_bytes() == before == b"a\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_parse_and_format_score():
    assert parse_score("") is None and parse_score("  ") is None and parse_score(None) is None
    assert parse_score("nan") is None and parse_score("NaN") is None
    assert parse_score(" 42.25 ") == 42.25 and parse_score("7") == 7.0
    with pytest.raises(PersonaError, match="row 3.*'abc'"):
        parse_score("abc", where="row 3 of x.csv")
    assert format_score(None) == "" and format_score(12) == "12.0"
    assert format_score(1 / 3) == "0.3333333333333333"
