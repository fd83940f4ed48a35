"""Latency of onnxruntime sessions: warm-up, repeated runs, median and p90, and an
interleaved A/B mode whose ratio survives a noisy machine (both models see the same noise)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import UsageError
from graphopt.verify.feeds import Feed


@dataclasses.dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, times: Sequence[float]) -> LatencyStats:
        ms = np.asarray(times) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 90)), float(ms.mean()), len(ms))


@dataclasses.dataclass
class ABLatency:
    a: LatencyStats
    b: LatencyStats
    threads: int
    pair_ratios: list[float] = dataclasses.field(default_factory=list)  # B block / adjacent A block

    @property
    def ratio(self) -> float:
        """The median over adjacent block pairs of B's block median over A's: each pair ran
        within a few hundred milliseconds, so a slow minute of a shared machine (other tenants,
        CPU steal) moves both sides of a pair alike. Without pairs, B's median over A's."""
        if self.pair_ratios:
            return float(np.median(self.pair_ratios))
        return self.b.median_ms / self.a.median_ms if self.a.median_ms > 0 else float("inf")

    def pooled(self, again: ABLatency) -> ABLatency:
        """This measurement and a second one as one: the pair ratios of both (the ratio is their
        median), the second's per-model statistics."""
        return ABLatency(again.a, again.b, again.threads, self.pair_ratios + again.pair_ratios)

    def to_dict(self) -> dict[str, Any]:
        return {"a": dataclasses.asdict(self.a), "b": dataclasses.asdict(self.b),
                "ratio": self.ratio, "threads": self.threads, "mode": "interleaved blocks, median of paired ratios",
                "pairs": len(self.pair_ratios)}


def _timed_run(session: Any, feed: Feed) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def measure(
    session: Any, feeds: Sequence[Feed], *, warmup: int = 3, runs: int = 50, max_seconds: float = 10.0
) -> LatencyStats:
    """Median and p90 over up to ``runs`` runs, stopping after ``max_seconds`` once 5 are done."""
    if runs < 1 or warmup < 0:
        raise UsageError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for i in range(warmup):
        _timed_run(session, feeds[i % len(feeds)])
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < runs and (len(times) < min(5, runs) or time.perf_counter() < deadline):
        times.append(_timed_run(session, feeds[len(times) % len(feeds)]))
    return LatencyStats.from_seconds(times)


def compare_interleaved(
    session_a: Any,
    session_b: Any,
    feeds: Sequence[Feed],
    *,
    threads: int,
    warmup: int = 3,
    rounds: int = 50,
    max_seconds: float = 20.0,
    block: int = 3,
    pause: float = 0.02,
) -> ABLatency:
    """Alternate short blocks of runs, A then B then B then A …, on the same feeds.

    Both sessions keep onnxruntime's default idle-thread spinning (as deployed). Before each
    block a short pause lets the other session's worker threads stop spinning — without it
    they steal the cores from a fast model for several runs — and the first run of the block
    is discarded. Alternating the order of the blocks cancels what remains.
    """
    for i in range(warmup):
        _timed_run(session_a, feeds[i % len(feeds)])
        _timed_run(session_b, feeds[i % len(feeds)])
    sessions = (session_a, session_b)
    times_a: list[float] = []
    times_b: list[float] = []
    pair_ratios = []
    deadline = time.perf_counter() + max_seconds
    index = 0
    while len(times_a) < rounds and (len(times_a) < 5 or time.perf_counter() < deadline):
        order = (0, 1) if (index // block) % 2 == 0 else (1, 0)
        blocks: list[list[float]] = [[], []]
        for side in order:
            time.sleep(pause)  # let the other session's worker threads stop spinning
            _timed_run(sessions[side], feeds[index % len(feeds)])  # discarded: see docstring
            blocks[side] = [_timed_run(sessions[side], feeds[(index + offset) % len(feeds)]) for offset in range(block)]
        block_a, block_b = blocks
        times_a += block_a
        times_b += block_b
        if np.median(block_a) > 0:
            pair_ratios.append(float(np.median(block_b) / np.median(block_a)))
        index += block
    return ABLatency(LatencyStats.from_seconds(times_a), LatencyStats.from_seconds(times_b), threads, pair_ratios)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _peak_rss_kib() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


@contextlib.contextmanager
def peak_memory() -> Iterator[Callable[[], float | None]]:
    """Peak resident memory (MiB) of this process during the block, where Linux lets us reset
    the high-water mark; yields a callable that returns it (None where it cannot be measured)."""
    reset = False
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")
        reset = True
    result: list[float | None] = [None]
    yield lambda: result[0]
    peak = _peak_rss_kib()
    result[0] = peak / 1024 if reset and peak is not None else None


# -- decoders ----------------------------------------------------------------------------------


def _timed(action: Any) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000.0


@dataclasses.dataclass(frozen=True)
class DecoderLatency:
    """Prefill ms of one prompt and decode ms/token after it (medians per model, ``base`` and
    ``candidate``), and the candidate's ratios (median of the paired rounds)."""

    prompt_tokens: int
    decode_tokens: int
    rounds: int
    prefill_ms: dict[str, float]
    decode_ms_per_token: dict[str, float]
    prefill_ratio: float
    decode_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SESSION_SWITCH_PAUSE = 0.1
"""Seconds to wait before timing a decoder right after another session ran: onnxruntime's idle
worker threads spin, and on a 2-core machine they take the cores from the next session's first
run. A generation's prefill *is* a first run, so it cannot be discarded as ``compare_interleaved``
discards one; measured on SmolLM2's float twin (int4 over fp32, first prefill after the other
model): 1.108× with no pause, 0.987× after 20 ms, 0.88–0.90× after 100 ms and after 300 ms,
0.87× for warm prefills back to back."""


def interleaved_latency(base: Any, candidate: Any, prompt: Sequence[int], *, decode_tokens: int = 16,
                        rounds: int = 5, pause: float = SESSION_SWITCH_PAUSE) -> DecoderLatency:
    """Two decoders (``verify.decoder.OrtDecoder``): prefill ms of ``prompt`` and decode ms/token
    after it, base and candidate alternating as ``compare_interleaved`` does for other models,
    each after ``pause`` seconds (``SESSION_SWITCH_PAUSE``)."""
    results: dict[str, dict[str, list[float]]] = {"base": {"prefill": [], "decode": []},
                                                  "candidate": {"prefill": [], "decode": []}}
    ids = np.asarray([list(prompt)], np.int64)
    for round_ in range(rounds + 1):  # the first round warms up and is not counted
        order = (("base", base), ("candidate", candidate)) if round_ % 2 == 0 else (("candidate", candidate), ("base", base))
        for label, decoder in order:
            state: dict[str, Any] = {}
            time.sleep(pause)  # the other session's worker threads stop spinning

            def prefill(decoder: Any = decoder, state: dict[str, Any] = state) -> None:
                state["logits"], state["cache"] = decoder.step(ids, decoder.empty_cache(), last=True)

            prefill_ms = _timed(prefill)

            def decode(decoder: Any = decoder, state: dict[str, Any] = state) -> None:
                logits, cache = state["logits"], state["cache"]
                for _ in range(decode_tokens):
                    token = np.asarray([[int(np.argmax(logits[0, -1]))]], np.int64)
                    logits, cache = decoder.step(token, cache)

            decode_ms = _timed(decode) / decode_tokens
            if round_:
                results[label]["prefill"].append(prefill_ms)
                results[label]["decode"].append(decode_ms)

    def ratio(kind: str) -> float:
        return statistics.median(c / b for c, b in zip(results["candidate"][kind], results["base"][kind]))

    return DecoderLatency(
        prompt_tokens=len(prompt), decode_tokens=decode_tokens, rounds=rounds,
        prefill_ms={label: statistics.median(v["prefill"]) for label, v in results.items()},
        decode_ms_per_token={label: statistics.median(v["decode"]) for label, v in results.items()},
        prefill_ratio=ratio("prefill"), decode_ratio=ratio("decode"))
