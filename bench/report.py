"""The bench's one table: figures, ratios against same-run references, targets, PASS/MISS."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Row:
    """One line of the table.

    `ours` and `reference` hold one figure per round, measured side by side; the ratio is
    computed per round (ours / reference), and the table shows its median and range.
    A row without reference compares the median of `ours` itself with the target.
    """

    measure: str
    clients: str
    unit: str
    ours: list[float]
    reference_label: str = ""
    reference: list[float] = field(default_factory=list)
    # ">=" or "<=": how the ratio (or, without reference, the figure) must compare to target.
    op: str = ""
    target: float | None = None
    note: str = ""
    # Unit of the reference figures, when not the unit of ours (pairs/s against tps).
    reference_unit: str = ""

    @property
    def ratios(self) -> list[float]:
        return [o / r for o, r in zip(self.ours, self.reference, strict=False) if r > 0]

    @property
    def value(self) -> float | None:
        """What the target applies to: the median ratio, or the median figure."""
        if self.reference:
            return statistics.median(self.ratios) if self.ratios else None
        return statistics.median(self.ours) if self.ours else None

    @property
    def result(self) -> str:
        if self.target is None:
            return "info"
        value = self.value
        if value is None:
            return "SKIP"
        ok = value >= self.target if self.op == ">=" else value <= self.target
        return "PASS" if ok else "MISS"


def fmt(value: float, unit: str) -> str:
    if unit in ("tps", "ev/s", "req/s", "pairs/s", "debits/s"):
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:g} {unit}"


def _target(row: Row) -> str:
    if row.target is None:
        return "-"
    sign = "≥" if row.op == ">=" else "≤"
    if row.reference:
        return f"{sign} {row.target:g}x"
    return f"{sign} {fmt(row.target, row.unit)}"


def _cells(row: Row) -> list[str]:
    ours = fmt(statistics.median(row.ours), row.unit) if row.ours else "-"
    if row.reference:
        unit = row.reference_unit or row.unit
        reference = f"{row.reference_label} {fmt(statistics.median(row.reference), unit)}"
        ratios = row.ratios
        if ratios:
            ratio = f"{statistics.median(ratios):.2f}x"
            if len(ratios) > 1:
                ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        else:
            ratio = "-"
    else:
        reference, ratio = (row.reference_label or "-"), "-"
    result = row.result
    if row.note:
        result += f" ({row.note})"
    return [row.measure, row.clients, ours, reference, ratio, _target(row), result]


HEADER = ["measure", "clients", "ours (median)", "reference (median)", "ratio", "target", "result"]


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    results = [row.result for row in rows if row.target is not None]
    return (
        f"targets: {results.count('PASS')} PASS, {results.count('MISS')} MISS, "
        f"{results.count('SKIP')} SKIP"
    )
