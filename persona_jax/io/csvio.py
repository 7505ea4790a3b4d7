"""Reference-format response CSVs: read, check columns, write atomically.

The reference writes one row per response with pandas `to_csv(index=False)`:
`question, prompt, answer, question_id, <trait>, coherence`; a score cell is empty when
the score is None. We use the stdlib `csv` module with the same dialect (comma, minimal
quoting, "\n" line ends) so files round-trip between the two implementations.
"""
from __future__ import annotations

import csv
import math
import os
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
        rows = [dict(r) for r in reader]
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
    Cells that are None are written empty; floats with `repr` (exact round trip).
    """
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in fieldnames})


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
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
