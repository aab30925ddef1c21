"""SmallStepThreads: how many CPU threads a decode step of one sequence gets, all of them or all but one,
chosen by measuring which gives the shorter time from one such step to the next.

NOTE: the process the engine streams to (the server, or LLM's caller) detokenizes and sends each token while
the next step runs. On all the cores it takes one from the step's threads, whose static halves then wait for it;
on all but one, the step streams its weights with a thread fewer. Which costs less depends on the host's
memory bandwidth per thread, the weights' size and how busy that process is (2 cores, served c=1: a Q4_0 file
runs 10% faster on one thread, its Q8_0 twin 7% slower), so it is measured, not guessed: a few steps each
way, the faster kept for a while, then measured again. The kernels' sums do not depend on the thread count.
"""
from __future__ import annotations

import statistics

TRIAL_STEPS = 32     # steps a trial of one count (the first interval after a switch is the old count's)
TRIALS = 3           # trials of each count, alternating, per measurement
KEEP_STEPS = 2048    # steps the faster count is kept before measuring again


class SmallStepThreads:
    def __init__(self, threads: int):
        self.options = (threads - 1, threads)
        self.chosen = threads
        self._schedule = self._trials()
        self._samples: dict[int, list[float]] = {t: [] for t in self.options}
        self._previous: tuple[float, int] | None = None   # (start, threads) of the last small step
        self._kept = 0

    def _trials(self) -> list[int]:
        return [t for _ in range(TRIALS) for t in self.options for _ in range(TRIAL_STEPS)]

    def next(self, now: float) -> int:
        """The threads for a small decode step starting at `now` (time.perf_counter())."""
        if self._previous is not None and self._schedule is not None:
            started, threads = self._previous
            self._samples[threads].append(now - started)
        if self._schedule is None:   # keeping the faster
            self._kept += 1
            if self._kept >= KEEP_STEPS:
                self._schedule, self._kept = self._trials(), 0
                self._samples = {t: [] for t in self.options}
        if self._schedule is not None:
            if self._schedule:
                threads = self._schedule.pop(0)
            else:   # measured: keep the faster (ties to all threads)
                medians = {t: statistics.median(s) for t, s in self._samples.items() if s}
                if len(medians) == len(self.options):
                    self.chosen = min(reversed(self.options), key=lambda t: medians[t])
                self._schedule = None
                threads = self.chosen
        else:
            threads = self.chosen
        self._previous = (now, threads)
        return threads

    def interrupt(self) -> None:
        """Another kind of step ran: the next small step's interval would include it."""
        self._previous = None
