"""The one search of every pass that compresses under a budget: a ladder of rungs, and the
fewest rungs whose candidate a judge (``verify.judge.Judge`` on tensors, ``verify.text.TextJudge``
on text) says meets its target.

A rung is one step back from the most compressed model the pass can build towards the original:
a layer moved from int8 compute to weight-only or to float (``quantize-int8``), from 4 to 8 bits
(``quantize-blockwise``), 1/32 less of the channels removed (``prune-channels``), more of the
parameters kept (``lowrank``). Rung 0 is the most compressed model, the last rung keeps
everything that can be kept. The ladder is taken to be monotone (more rungs are never judged
worse), so the fewest rungs are found by bisection, ⌈log2(rungs)⌉ judgements.

When the final verification finds the result over its budget on data the search never saw,
``optimize`` runs the passes again with ``PassContext.retreat`` = 1, 2, …: each retreat halves
the compression the search found (``retreat``), the one rule for every ladder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from graphopt.verify.judge import Verdict

V = TypeVar("V", bound=Verdict)


def fewest_rungs(judge: Callable[[int], V], low: int, high: int, top: V | None = None) -> tuple[int, V | None]:
    """The fewest rungs n in (``low``, ``high``] whose verdict ``judge(n)`` meets its target.

    ``high`` is taken to meet it (``top``: its verdict, when measured), ``low`` to miss it
    (``low = -1``: even no rung may do)."""
    best = (high, top)
    while high - low > 1:
        middle = (low + high) // 2
        verdict = judge(middle)
        if verdict.meets_target:
            high, best = middle, (middle, verdict)
        else:
            low = middle
    return best


def most_rungs(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The most rungs n in [``low``, ``high``] for which ``fits(n)`` holds (a limit each rung
    takes more of, such as time per token; ``low`` taken to fit): ``high`` is tried first, then
    bisection below it."""
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def retreat(rungs: int, total: int, times: int) -> int:
    """The rung ``times`` retreats take a search's result to: each halves the compression left,
    the ``total - rungs`` rungs not taken (rounded towards keeping more)."""
    if times <= 0:
        return rungs
    return total - (total - rungs) // 2**times


__all__ = ["fewest_rungs", "most_rungs", "retreat"]
