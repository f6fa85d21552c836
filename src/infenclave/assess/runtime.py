"""Running the oracle fast: ONNX Runtime sessions, thread settings and batch size by measurement.

The oracle forwards are nearly all of an assessment's time, so the runtime setting matters
more than anything else. Which setting is fastest depends on the machine and on what else runs
on it: on the 2-core development box two single-thread sessions side by side beat one
two-thread session at small batches, and batch 64 was slower than batch 8 (cache pressure).
Rather than hard-code a guess, `Tuner` tries a few candidate settings on the first batches of
*real* work (nothing is computed twice) and keeps the fastest.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from infenclave.enclave.onnx_runner import OnnxPart

TRIAL_BATCHES = 3  # per candidate; the first one only warms the session and is not timed


@dataclass(frozen=True)
class RuntimeConfig:
    """How the oracle runs: `workers` sessions side by side, `threads` each, `batch` images a call."""

    workers: int
    threads: int
    batch: int

    def label(self) -> str:
        return f"{self.workers} session(s) x {self.threads} thread(s), batch {self.batch}"

    def to_dict(self) -> dict[str, int]:
        return {"workers": self.workers, "threads": self.threads, "batch": self.batch}


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def candidate_configs(cores: int | None = None) -> list[RuntimeConfig]:
    """Settings worth trying: one session per core or one session using every core; batch 8/16.

    Larger batches were never faster on CPU in our measurements (the activations of a batch of
    32+ 224 px images no longer fit in cache), smaller ones pay per-call overhead. Each trial
    costs a little (a slower setting, a drained pipeline), so the list stays short.
    """
    n = cores or cpu_count()
    if n == 1:
        return [RuntimeConfig(1, 1, 8), RuntimeConfig(1, 1, 16)]
    # (1 session x n threads, batch 8) was the slowest in every measurement here: not tried
    return [RuntimeConfig(n, 1, 8), RuntimeConfig(1, n, 16), RuntimeConfig(n, 1, 16)]


class SessionPool:
    """ORT sessions of one model, created on demand per thread setting, run from a thread pool.

    ORT releases the GIL while it computes, so Python threads give true parallelism here.
    """

    def __init__(self, model_bytes: bytes, max_workers: int) -> None:
        self._bytes = model_bytes
        self._free: dict[int, queue.SimpleQueue[OnnxPart]] = {}
        self._count: dict[int, int] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oracle")

    def ensure(self, cfg: RuntimeConfig) -> None:
        """Create the sessions `cfg` needs (session creation is not counted as run time)."""
        with self._lock:
            q = self._free.setdefault(cfg.threads, queue.SimpleQueue())
            while self._count.get(cfg.threads, 0) < cfg.workers:
                q.put(OnnxPart(self._bytes, threads=cfg.threads))
                self._count[cfg.threads] = self._count.get(cfg.threads, 0) + 1

    def submit(self, cfg: RuntimeConfig, x: np.ndarray) -> Future[np.ndarray]:
        self.ensure(cfg)
        return self._executor.submit(self._run, cfg.threads, x)

    def _run(self, threads: int, x: np.ndarray) -> np.ndarray:
        q = self._free[threads]
        part = q.get()  # at most `workers` batches of one setting are in flight at a time
        try:
            return part(x)
        finally:
            q.put(part)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Tuner:
    """Picks the fastest `RuntimeConfig` by timing the first batches of real work under each.

    Protocol with the scan loop: submit batches of `config.batch` images, at most
    `config.workers + 1` in flight (one queued so that a session never waits for Python), and
    only when `may_submit` says so (a setting is timed alone: the loop drains between
    settings). Report every finished batch with `done`.
    """

    def __init__(
        self, candidates: list[RuntimeConfig], *, fixed: bool = False, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if not candidates:
            raise ValueError("no runtime candidates")
        self._candidates = candidates
        self._i = 0
        self._clock = clock
        self._tuning = not fixed and len(candidates) > 1
        self._finished = 0  # batches finished under the current candidate
        self._t0 = 0.0
        self._images = 0
        self.rates: dict[RuntimeConfig, float] = {}
        self.chosen: RuntimeConfig | None = None if self._tuning else candidates[0]

    @property
    def config(self) -> RuntimeConfig:
        return self.chosen or self._candidates[self._i]

    @property
    def depth(self) -> int:
        return self.config.workers + 1

    def may_submit(self, in_flight: list[RuntimeConfig]) -> bool:
        cfg = self.config
        if any(c != cfg for c in in_flight):
            return False  # drain the previous setting first
        if self._tuning and len(in_flight) + self._finished >= TRIAL_BATCHES:
            return False  # enough trial batches of this setting are under way
        return len(in_flight) < self.depth

    def done(self, cfg: RuntimeConfig, images: int) -> None:
        if not self._tuning or cfg != self._candidates[self._i]:
            return
        now = self._clock()
        self._finished += 1
        if self._finished == 1:
            self._t0, self._images = now, 0  # the first batch warms the sessions
            return
        self._images += images
        if self._finished >= TRIAL_BATCHES:
            self.rates[cfg] = self._images / max(now - self._t0, 1e-9)
            self._i += 1
            self._finished = 0
            if self._i == len(self._candidates):
                self._tuning = False
                self.chosen = max(self.rates, key=lambda c: self.rates[c])

    def summary(self) -> dict[str, object]:
        return {
            "chosen": self.config.to_dict(),
            "tuned": bool(self.rates),
            "trials": [{**c.to_dict(), "images_per_s": round(r, 1)} for c, r in self.rates.items()],
        }


@dataclass(frozen=True)
class PlainRate:
    """Throughput of the bare model under one setting: per wall second and per CPU second.

    On a shared machine the wall rate moves with everyone else's load; the rate per CPU
    second of this process (all threads) hardly does, so the two together say what is ours.
    """

    images_per_s: float
    images_per_cpu_s: float


def plain_throughput(
    model_bytes: bytes, x: np.ndarray, configs: list[RuntimeConfig], *, seconds: float = 3.0
) -> dict[RuntimeConfig, PlainRate]:
    """Throughput of the bare model under each setting, on the batch source `x` (N >= batch).

    The ceiling an assessment can reach on this machine: no projection, no bookkeeping.
    """
    rates: dict[RuntimeConfig, PlainRate] = {}
    for cfg in configs:
        pool = SessionPool(model_bytes, cfg.workers)
        pool.ensure(cfg)
        batch = np.ascontiguousarray(x[: cfg.batch])
        for f in [pool.submit(cfg, batch) for _ in range(cfg.workers)]:
            f.result()  # warm-up
        done = 0
        t0, c0 = time.perf_counter(), time.process_time()
        in_flight: list[Future[np.ndarray]] = []
        while time.perf_counter() - t0 < seconds:
            while len(in_flight) < cfg.workers + 1:
                in_flight.append(pool.submit(cfg, batch))
            in_flight.pop(0).result()
            done += cfg.batch
        for f in in_flight:
            f.result()
            done += cfg.batch
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rates[cfg] = PlainRate(done / wall, done / max(cpu, 1e-9))
        pool.close()
    return rates
