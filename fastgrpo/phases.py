"""Where a step's time goes: named phases timed by the trainer, one record per step.

The trainer wraps every part of a step in ``timer.phase(name)``; ``timer.pop()`` returns the
seconds per phase since the last pop (``<name>_s``), which go into metrics.jsonl. On CUDA the
device is synchronized at both ends of a phase, or asynchronous kernels would bill their time to
whichever phase next waits for them. ``fastgrpo profile`` uses the same timer with memory tracking.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

# The phases of one GRPO step, in the order they run (fastgrpo/trainer.py).
PHASES = ("rollout", "reward", "reference", "old_logprobs", "forward", "backward", "optimizer", "sync")


class PhaseTimer:
    """Accumulates wall time (and, if ``memory_probe`` is given, peak memory) per named phase.

    ``memory_probe(name, start)`` is called at the start (``start=True``) and the end of each phase
    and returns the phase's peak bytes at the end (e.g. CUDA's max_memory_allocated after a reset,
    or a sampled RSS peak); the largest value per phase is kept in ``peak_bytes``.
    """

    def __init__(self, device: torch.device | str = "cpu", memory_probe: Callable[[str, bool], int | None] | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self.memory_probe = memory_probe
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_bytes: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        if self.memory_probe is not None:
            self.memory_probe(name, True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0
            if self.memory_probe is not None:
                peak = self.memory_probe(name, False)
                if peak is not None:
                    self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), int(peak))

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last pop, as ``{"<phase>_s": seconds}``; resets the counters."""
        out = {f"{name}_s": s for name, s in self.seconds.items()}
        self.seconds = defaultdict(float)
        return out

    def pop_peaks(self) -> dict[str, int]:
        """Peak bytes per phase since the last call; resets them."""
        out, self.peak_bytes = self.peak_bytes, {}
        return out
