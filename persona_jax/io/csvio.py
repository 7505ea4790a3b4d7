"""Reference-format response CSVs: read, check columns, write atomically.

The reference writes one row per response with pandas `to_csv(index=False)`:
`question, prompt, answer, question_id, <trait>, coherence`; a score cell is empty when
the score is None. We use the stdlib `csv` module with the same dialect (comma, minimal
quoting, "\n" line ends) so files round-trip between the two implementations.

Any text a tokenizer can decode survives the round trip, through our reader and through
pandas `read_csv`:
* a field holding a carriage return is quoted (the stdlib writer, like pandas' `to_csv`,
  quotes only the characters of its line terminator, so a lone "\r" would end the row);
* NUL is the one character pandas' C parser does not keep (before pandas 3.1 a field that
  starts with NUL reads as NaN and a string field is cut at it), so cells are escaped
  losslessly: NUL -> "\u2400" + "0" and a literal "\u2400" (SYMBOL FOR NULL) -> "\u2400"
  twice. Our reader undoes it; after `pandas.read_csv` apply `unescape_cell` to the text
  columns. A cell without NUL or U+2400 is written unchanged, so files without them are
  byte-identical to pandas' own.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from persona_jax.io.atomic import atomic_open
from persona_jax.errors import PersonaError
from persona_jax.io.distributed import writer_only

RESPONSE_COLUMNS = ("question", "prompt", "answer", "question_id")

# Answers can be long (up to 1000 generated tokens plus a long prompt); the stdlib
# default of 128 KiB per field is too small for some.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


# Lossless escaping of NUL (see the module docstring).
ESCAPE = "\u2400"  # SYMBOL FOR NULL
_UNESCAPE = re.compile(ESCAPE + "([" + ESCAPE + "0])")


def escape_cell(text: str) -> str:
    """NUL -> U+2400 "0", U+2400 -> U+2400 U+2400; other text unchanged."""
    if "\0" not in text and ESCAPE not in text:
        return text
    return text.replace(ESCAPE, ESCAPE * 2).replace("\0", ESCAPE + "0")


def unescape_cell(text):
    """Inverse of `escape_cell` (non-strings, e.g. pandas' NaN, pass through)."""
    if not isinstance(text, str) or ESCAPE not in text:
        return text
    return _UNESCAPE.sub(lambda m: "\0" if m.group(1) == "0" else ESCAPE, text)


def response_columns(trait: str) -> list[str]:
    """Column order of a reference response CSV for `trait`."""
    return [*RESPONSE_COLUMNS, trait, "coherence"]


def check_columns(fieldnames: Sequence[str], required: Iterable[str], where: str) -> None:
    """Raise PersonaError naming every required column absent from `fieldnames`."""
    missing = [c for c in required if c not in fieldnames]
    if missing:
        raise PersonaError(
            f"{where} is missing column(s) {', '.join(missing)} (it has "
            f"{', '.join(fieldnames) or 'no columns'}); use a response CSV with columns "
            f"{', '.join(RESPONSE_COLUMNS)}."
        )


def read_csv(
    path: str | os.PathLike, required: Iterable[str] = ()
) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV into (column names, rows as {column: cell text}).

    Raises PersonaError if the file is missing, has no header, or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise PersonaError(f"CSV file {path} does not exist; check the path or produce it first.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fieldnames = list(reader.fieldnames or [])
        rows = [{k: unescape_cell(v) for k, v in r.items()} for r in reader]
    if not fieldnames:
        raise PersonaError(f"CSV file {path} is empty (no header row); regenerate it.")
    check_columns(fieldnames, required, f"CSV file {path}")
    for r in rows:
        # A short row (fewer cells than the header) reads as None; normalise to "".
        for k in fieldnames:
            if r.get(k) is None:
                r[k] = ""
    return fieldnames, rows


@writer_only
def write_csv_atomic(
    path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[Mapping[str, object]]
) -> None:
    """Write rows to `path` via a temporary file in the same folder and `os.replace`.

    A crash or kill leaves either the old file or the new one, never a half-written one.
    Cells that are None are written empty; floats with `repr` (exact round trip); text
    escaped by `escape_cell`, and quoted when it holds a carriage return.
    """
    fieldnames = list(fieldnames)
    # The writer quotes the characters of its line terminator: with "\r\n" both CR and
    # LF are quoted; each row's terminator is then written as the reference's "\n".
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")

    def line(cells) -> str:
        buf.seek(0)
        buf.truncate()
        writer.writerow(cells)
        return buf.getvalue()[:-2] + "\n"

    with atomic_open(path, "w", newline="") as f:
        f.write(line(fieldnames))
        for row in rows:
            f.write(line([_cell(row.get(k)) for k in fieldnames]))


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return escape_cell(value)
    return value


def parse_score(cell: Optional[str], where: str = "a score cell") -> Optional[float]:
    """A score cell -> float, or None for an empty / "nan" cell (pandas writes NaN empty)."""
    if cell is None:
        return None
    text = cell.strip()
    if not text or text.lower() == "nan":
        return None
    try:
        value = float(text)
    except ValueError:
        raise PersonaError(
            f"{where} holds {cell!r}, which is not a number; put a number there or leave it "
            "empty for a missing score."
        ) from None
    return None if math.isnan(value) else value


def format_score(score: Optional[float]) -> str:
    """A score -> cell text: "" for None, `repr(float)` otherwise."""
    return "" if score is None else repr(float(score))
