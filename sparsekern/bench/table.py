"""The fixed-width table every ``sparsekern bench`` suite prints: numbered rows, its notes underneath.

A suite declares its table as a tuple of :class:`Column` (a header and how to write a row's cell); the
helpers below build the usual ones. Rows are the result dicts the suite writes to JSON, so a missing
or ``None`` value prints as ``-``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Column:
    """One table column: ``head`` over ``cell(row)`` for every row; numbers are right-aligned."""

    head: str
    cell: Callable[[Row], str]
    right: bool = False


def value(v: Any, spec: str, suffix: str = "") -> str:
    """``format(v, spec) + suffix``, or ``-`` when ``v`` is missing or not a number."""
    if v is None or isinstance(v, (str, bool)):
        return "-"
    return format(v, spec) + suffix


def text(head: str, key: str) -> Column:
    """The row's ``key`` as text (``-`` when missing or empty)."""
    return Column(head, lambda r: str(r.get(key) if r.get(key) not in (None, "") else "-"))


def num(head: str, key: str, spec: str, suffix: str = "") -> Column:
    """The row's number ``key`` formatted with ``spec`` (e.g. ``".3f"``), right-aligned."""
    return Column(head, lambda r: value(r.get(key), spec, suffix), right=True)


def times(x: Optional[float]) -> str:
    """A ratio as ``2.35x`` (``12.3x`` from 10 on); ``-`` when missing."""
    if x is None or isinstance(x, (str, bool)):
        return "-"
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def ratio(head: str, key: str) -> Column:
    """The row's ratio ``key`` (peer time / sparsekern time, or the like) as ``2.35x``."""
    return Column(head, lambda r: times(r.get(key)), right=True)


def met(row: Row) -> str:
    """``yes`` / ``NO`` / ``-`` (no target) for an ``ok`` row, else its status in capitals (``ERROR``)."""
    status = row.get("status") or "?"
    if status != "ok":
        return str(status).upper()
    return {True: "yes", False: "NO"}.get(row.get("target_met"), "-")


MET = Column("met", met)


def _spans(nums: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    parts: list[str] = []
    for n in nums:
        if parts and parts[-1].split("-")[-1] == str(n - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return ", ".join(parts)


def _cells(rows: Sequence[Row], columns: Sequence[Column]) -> list[list[str]]:
    return [[c.cell(r) for c in columns] for r in rows]


def _line(cells: Sequence[str], widths: Sequence[int], columns: Sequence[Column], n: str) -> str:
    padded = (c.rjust(w) if col.right else c.ljust(w) for c, w, col in zip(cells, widths, columns))
    return f"{n:>3} {'  '.join(padded)}".rstrip()


def format_table(rows: Sequence[Row], columns: Sequence[Column], first: int = 1, notes: bool = True) -> str:
    """Header, a rule, one numbered line per row (from ``first``), then ``notes:`` (each distinct row note
    once, with the rows it belongs to)."""
    heads = [c.head for c in columns]
    body = _cells(rows, columns)
    widths = [max(len(x[i]) for x in [heads, *body]) for i in range(len(columns))]
    out = [_line(heads, widths, columns, "#"), _line(["-" * w for w in widths], widths, columns, "---")]
    out += [_line(cells, widths, columns, str(first + i)) for i, cells in enumerate(body)]
    by_note: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("note"):
            by_note.setdefault(str(r["note"]), []).append(first + i)
    if notes and by_note:
        out.append("notes:")
        out += [f"  row{'s' if len(nums) > 1 else ''} {_spans(nums)}: {note}"
                for note, nums in by_note.items()]
    return "\n".join(out)


def row_lines(rows: Sequence[Row], columns: Sequence[Column], first: int = 1) -> list[str]:
    """Just the numbered lines of ``rows`` (no header, no notes): progress output while a suite runs."""
    return format_table(rows, columns, first, notes=False).splitlines()[2:]
