"""Progress of long work, shown the way its reader sees it: a bar on a terminal, a plain line
every few seconds in a log (CI, a file, a pipe: no carriage returns piling up), and nothing
when graphopt's logger is quieter than INFO (``-q``, or a library caller who configured no
logging). The library itself never prints: the lines go through the ``graphopt`` logger.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("graphopt.progress")

# A log gets one line per this many seconds at most.
LOG_EVERY_SECONDS = 10.0


class Progress:
    """``with Progress("int8 layers", total=30) as p: ... p.update()``."""

    def __init__(self, label: str, total: int | None = None, *, unit: str = "item", enabled: bool = True) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.postfix = ""
        self._bar: Any = None
        self._last = time.monotonic()
        if not enabled or not logging.getLogger("graphopt").isEnabledFor(logging.INFO):
            self.mode = "off"
        elif sys.stderr.isatty():
            self.mode = "bar"
        else:
            self.mode = "lines"

    def __enter__(self) -> Progress:
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=f"graphopt: {self.label}", unit=self.unit, leave=False,
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.25)
        return self

    def update(self, count: int = 1, **postfix: Any) -> None:
        self.done += count
        if postfix:
            self.postfix = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            self._bar.update(count)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        elif self.mode == "lines" and time.monotonic() - self._last >= LOG_EVERY_SECONDS:
            self._last = time.monotonic()
            of = f"/{self.total} {self.unit}s" if self.total else f" {self.unit}s"
            logger.info("%s: %d%s%s", self.label, self.done, of, f" ({self.postfix})" if self.postfix else "")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(items: Iterable[T], label: str, *, unit: str = "item", enabled: bool = True) -> Iterator[T]:
    """``items``, reporting progress through them."""
    items = list(items)
    with Progress(label, len(items), unit=unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update()
