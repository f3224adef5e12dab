"""``--accel-threads``: how many CPU threads the fast generator decodes with.

A decoding step is hundreds of small operations, each an OpenMP parallel region whose threads meet at a
barrier. When another process keeps a core busy, a thread of ours waits for its turn on the CPU at every
barrier, and a step with 2 threads was measured 30x slower than with 1 (issue 12: 279 ms against 8.6 ms). No
fixed count is right on a shared machine, so ``auto`` measures: the first batch warms up (its one-time costs,
such as building the C++ step and first touches of memory, made 2 threads look 2x slower than 1 on an idle
2-core machine where they are 1.3x faster), then the two take turns for :data:`ROUNDS` batches each (torch's
thread count, 1, torch's, 1: fairseq-generate's background thread still collates the first batches while they
decode, and batches grow longer; with one batch each, auto judged 2 threads no faster than 1 on the mini NMT test
set, which they decode 1.55x faster), and the faster per decoded row (seconds per hypothesis and step, the
best of its batches) is kept and said in one line; 1 thread must be :data:`MARGIN` faster to be kept, since
those first batches still favour it (2 threads measured 69 against 1 thread's 74 us per row there, 36 against 64
on the same batches decoded without fairseq-generate's loader). Where the kept setting later runs more than
:data:`SLOWDOWN` times slower per row than it was measured (the machine's load changed), both are measured again.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch

logger = logging.getLogger(__name__)
SLOWDOWN = 3.0  # a kept setting this much slower than measured starts a new measurement
ROUNDS = 2  # measured batches per candidate thread count
MARGIN = 1.1  # fewer threads are kept only if this much faster per row (the measured batches still favour them)
T = TypeVar("T")
THREAD_CHOICES = "auto, torch (torch's thread count as set: torch.set_num_threads / OMP_NUM_THREADS) or a number"


def parse_accel_threads(value: str) -> Optional[int]:
    """``--accel-threads``: None for ``auto``, 0 for ``torch``, else the thread count (a ValueError otherwise)."""
    if value == "auto":
        return None
    if value == "torch":
        return 0
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"--accel-threads must be {THREAD_CHOICES}, got {value!r}")


class ThreadChooser:
    """Runs each batch the fast generator decodes at the thread count ``--accel-threads`` says, and gives
    torch's own count back afterwards."""

    def __init__(self, setting: str):
        fixed = parse_accel_threads(setting)
        self.fixed = fixed  # None: auto; 0: leave torch's count alone
        most = torch.get_num_threads()
        self.candidates: List[int] = [most, 1] if fixed is None and most > 1 else []
        self.seconds_per_row: Dict[int, List[float]] = {}  # each candidate's measured batches
        self.chosen: Optional[int] = None
        self.warmed_up = False  # the first batch is not measured

    def run(self, decode: Callable[[], Tuple[T, int]]) -> T:
        """``decode()``'s result; it returns (result, rows decoded: hypotheses times steps), run at this
        batch's thread count."""
        count = self._count_for_batch()
        previous = torch.get_num_threads()
        if count:
            torch.set_num_threads(count)
        start = time.perf_counter()
        try:
            result, rows = decode()
        finally:
            torch.set_num_threads(previous)
        if self.candidates and rows:
            if self.warmed_up:
                self._record(count, (time.perf_counter() - start) / rows)
            self.warmed_up = True
        return result

    def _measured(self, count: int) -> int:
        return len(self.seconds_per_row.get(count, []))

    def _count_for_batch(self) -> Optional[int]:
        if not self.candidates:
            return self.fixed or None
        fewest = min(self.candidates, key=self._measured)  # in turn: the first with the fewest measured batches
        return fewest if self._measured(fewest) < ROUNDS else self.chosen

    def _record(self, count: int, rate: float) -> None:
        if self._measured(count) < ROUNDS:
            self.seconds_per_row.setdefault(count, []).append(rate)
            if all(self._measured(candidate) == ROUNDS for candidate in self.candidates):
                self._choose()
        elif rate > SLOWDOWN * min(self.seconds_per_row[count]):  # the load changed: measure again
            self.seconds_per_row = {}

    def _choose(self) -> None:
        best_rates = {count: min(rates) for count, rates in self.seconds_per_row.items()}
        best = self.candidates[0]  # torch's count, unless another is faster by MARGIN
        for count in self.candidates[1:]:
            if best_rates[count] * MARGIN < best_rates[best]:
                best = count
        if best != self.chosen:
            measured = ", ".join(f"{count} thread{'s' if count > 1 else ''}: {best_rates[count] * 1e6:.0f} us"
                                 for count in self.candidates)
            logger.info(f"--accel-threads auto: decoding with {best} thread{'s' if best > 1 else ''} "
                        f"(per hypothesis and step, {measured})")
        self.chosen = best
