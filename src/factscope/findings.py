"""Findings: what a run shows, in a few plain sentences and a claims table.

Each analysis computes, from its own results, ``findings`` (sentences with the numbers and their
intervals) and ``claims`` (one :class:`Claim` per claim of the paper it reproduces: what the paper
says, what this model shows, whether it holds) and passes them to its report section
(``Run.add_section(..., findings=..., claims=...)``, or ``loop.publish(section={...})``). The report
shows them first; notebooks get them from the result objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Claim:
    """One claim of a paper checked on this model.

    ``claim``: the claim in a few words; ``paper``: what the paper reports (with its model);
    ``this_model``: what this run measured, with numbers; ``holds``: True, False, or None when the
    run cannot tell (too few facts, interval spans the threshold)."""

    claim: str
    paper: str
    this_model: str
    holds: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: "Claim | Mapping[str, Any]") -> "Claim":
        if isinstance(d, Claim):
            return d
        missing = [k for k in ("claim", "paper", "this_model", "holds") if k not in d]
        if missing:
            raise ValueError(f"claim {dict(d)!r} lacks {missing}")
        holds = d["holds"]
        if holds is not None and not isinstance(holds, bool):
            raise ValueError(f"claim {d['claim']!r}: holds must be True, False or None, not {holds!r}")
        return cls(str(d["claim"]), str(d["paper"]), str(d["this_model"]), holds)


def holds_word(holds: bool | None) -> str:
    """"holds", "does not hold" or "undecided"."""
    return {True: "holds", False: "does not hold", None: "undecided"}[holds]


def num(x: float | None, digits: int = 2) -> str:
    """A number as a reader wants it in a sentence: fixed digits, "n/a" for None/NaN."""
    if x is None or x != x:
        return "n/a"
    return f"{x:.{digits}f}"


def with_interval(x: float | None, lo: float | None = None, hi: float | None = None, digits: int = 2,
                  pct: bool = False) -> str:
    """``0.56 [0.48, 0.63]`` (or ``56% [48, 63]`` with ``pct``); the interval left out when unknown."""
    if pct:
        f = lambda v: "n/a" if v is None or v != v else f"{100 * v:.0f}"  # noqa: E731
        main = f(x) + ("%" if x is not None and x == x else "")
    else:
        f = lambda v: num(v, digits)  # noqa: E731
        main = f(x)
    if lo is None or hi is None or lo != lo or hi != hi:
        return main
    return f"{main} [{f(lo)}, {f(hi)}]"
