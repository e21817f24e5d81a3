"""Figures: named lists of samples, summarised as median and p95."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Figure:
    name: str
    unit: str
    # The figure this one is compared with (same run), or None.
    baseline: str | None = None
    values: list[float] = field(default_factory=list)
    # Why there is no value (a feature not built yet, a phase that failed).
    reason: str | None = None
    # What was measured, exactly (shown in the JSON, for readers of the numbers).
    note: str | None = None
    target: str | None = None

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def p95(self) -> float | None:
        return percentile(self.values, 0.95) if self.values else None

    def as_json(self) -> dict:
        document: dict = {
            "median": _rounded(self.median),
            "p95": _rounded(self.p95),
            "unit": self.unit,
            "samples": len(self.values),
            "baseline": self.baseline,
            "values": [_rounded(value) for value in self.values],
        }
        if self.reason is not None and not self.values:
            document["reason"] = self.reason
        if self.note:
            document["note"] = self.note
        if self.target:
            document["target"] = self.target
        return document


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Figures:
    """All figures of one run, in the order they were declared."""

    def __init__(self) -> None:
        self._figures: dict[str, Figure] = {}

    def declare(
        self,
        name: str,
        unit: str,
        *,
        baseline: str | None = None,
        note: str | None = None,
        target: str | None = None,
    ) -> Figure:
        figure = self._figures.get(name)
        if figure is None:
            figure = Figure(name, unit, baseline=baseline, note=note, target=target)
            self._figures[name] = figure
        return figure

    def __getitem__(self, name: str) -> Figure:
        return self._figures[name]

    def __iter__(self):
        return iter(self._figures.values())

    def missing(self, name: str, reason: str) -> None:
        """Record why a figure has no value (keeps the first reason given)."""
        figure = self._figures[name]
        if not figure.values and figure.reason is None:
            figure.reason = reason

    def as_json(self) -> dict:
        return {figure.name: figure.as_json() for figure in self._figures.values()}
