"""Prometheus text-format metrics: requests, in-flight gauge, latency histograms, build info.

Why our own ~150 lines instead of a client library: the set is small and fixed, and the
host already has enough dependencies. Output follows the Prometheus text exposition format
version 0.0.4 (``# HELP``/``# TYPE`` lines, cumulative ``_bucket{le=...}``, ``_sum``,
``_count``).

- ``infenclave_requests_total{endpoint, outcome, code}``: every HTTP request, by route
  (``classify``, ``attestation``, ...; ``other`` for paths the API does not have), outcome
  (``ok`` or the error code of the JSON answer) and HTTP status code.
- ``infenclave_request_seconds{endpoint}``: whole requests at the host, end to end.
- ``infenclave_requests_in_flight``: requests being served now.
- ``infenclave_stage_seconds{stage}``: the *parts* of one classification, never the whole
  (so that a ``sum()`` over stages means something): ``open`` (HPKE open + request parse,
  enclave), ``decode`` (image decode + preprocess, enclave), ``frontnet`` and ``tail``
  (enclave), ``seal`` (enclave), ``backnet_batch`` (one BackNet batch on the host),
  ``enclave_in`` / ``enclave_out`` (host wait for IR1 / for the result, channel included).
- ``infenclave_info{version, model_id, tee}``: always 1; which build serves which model.
"""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["LATENCY_BUCKETS_S", "Metrics"]

#: Seconds; spans sub-millisecond channel hops to multi-second overload.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


class Metrics:
    """Thread-safe counters and histograms, rendered with `render`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._request_seconds: dict[str, _Histogram] = {}
        self._in_flight = 0
        self._info: dict[str, str] = {}
        self._stages: dict[str, _Histogram] = {}
        self._batch = _Histogram(tuple(float(b) for b in BATCH_BUCKETS))
        self._restarts = 0
        self._workers_ready = 0
        self._backnet_check_failures = 0

    def set_info(self, **labels: str) -> None:
        """The labels of ``infenclave_info`` (version, model id, TEE)."""
        with self._lock:
            self._info = dict(labels)

    def request_started(self) -> None:
        """A request is being served (the in-flight gauge goes up)."""
        with self._lock:
            self._in_flight += 1

    def request_finished(self, endpoint: str, outcome: str, code: int, seconds: float) -> None:
        """A request to *endpoint* ended with *outcome* (``ok`` or an error code) and *code*."""
        with self._lock:
            self._in_flight -= 1
            self._requests[(endpoint, outcome, code)] += 1
            hist = self._request_seconds.get(endpoint)
            if hist is None:
                hist = self._request_seconds[endpoint] = _Histogram(LATENCY_BUCKETS_S)
            hist.observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record the duration of one stage of one request."""
        with self._lock:
            hist = self._stages.get(stage)
            if hist is None:
                hist = self._stages[stage] = _Histogram(LATENCY_BUCKETS_S)
            hist.observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one BackNet batch."""
        with self._lock:
            self._batch.observe(float(size))
        self.observe_stage("backnet_batch", seconds)

    def worker_restarted(self) -> None:
        """An enclave worker died and was replaced."""
        with self._lock:
            self._restarts += 1

    def backnet_check_failed(self) -> None:
        """An enclave refused the host's BackNet output (a failed verification)."""
        with self._lock:
            self._backnet_check_failures += 1

    def set_workers_ready(self, n: int) -> None:
        """How many enclave workers can serve right now."""
        with self._lock:
            self._workers_ready = n

    def render(self) -> str:
        """The metrics in Prometheus text format."""
        lines: list[str] = []
        with self._lock:
            if self._info:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(self._info.items()))
                lines += [
                    "# HELP infenclave_info Which infenclave build serves which model.",
                    "# TYPE infenclave_info gauge",
                    f"infenclave_info{{{labels}}} 1",
                ]
            lines += [
                "# HELP infenclave_requests_total HTTP requests by endpoint, outcome and status code.",
                "# TYPE infenclave_requests_total counter",
            ]
            for (endpoint, outcome, code), n in sorted(self._requests.items()):
                lines.append(
                    f'infenclave_requests_total{{endpoint="{endpoint}",outcome="{outcome}",code="{code}"}} {n}'
                )
            errors = sum(n for (_, outcome, _), n in self._requests.items() if outcome != "ok")
            lines += [
                "# HELP infenclave_errors_total Requests that did not end ok.",
                "# TYPE infenclave_errors_total counter",
                f"infenclave_errors_total {errors}",
            ]
            lines += [
                "# HELP infenclave_requests_in_flight Requests being served now.",
                "# TYPE infenclave_requests_in_flight gauge",
                f"infenclave_requests_in_flight {self._in_flight}",
            ]
            lines += [
                "# HELP infenclave_request_seconds Whole requests at the host, by endpoint.",
                "# TYPE infenclave_request_seconds histogram",
            ]
            for endpoint, hist in sorted(self._request_seconds.items()):
                lines += _hist_lines("infenclave_request_seconds", hist, f'endpoint="{endpoint}"')
            lines += [
                "# HELP infenclave_stage_seconds Latency of each part of a classification "
                "(parts only; the whole is infenclave_request_seconds).",
                "# TYPE infenclave_stage_seconds histogram",
            ]
            for stage, hist in sorted(self._stages.items()):
                lines += _hist_lines("infenclave_stage_seconds", hist, f'stage="{stage}"')
            lines += [
                "# HELP infenclave_backnet_batch_size Requests per BackNet batch.",
                "# TYPE infenclave_backnet_batch_size histogram",
            ]
            lines += _hist_lines("infenclave_backnet_batch_size", self._batch, "")
            lines += [
                "# HELP infenclave_worker_restarts_total Enclave workers replaced after dying.",
                "# TYPE infenclave_worker_restarts_total counter",
                f"infenclave_worker_restarts_total {self._restarts}",
                "# HELP infenclave_workers_ready Enclave workers ready to serve.",
                "# TYPE infenclave_workers_ready gauge",
                f"infenclave_workers_ready {self._workers_ready}",
                "# HELP infenclave_backnet_check_failures_total IR2 frames an enclave refused "
                "because a BackNet check failed (or, after max_failures, any IR2).",
                "# TYPE infenclave_backnet_check_failures_total counter",
                f"infenclave_backnet_check_failures_total {self._backnet_check_failures}",
            ]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """A label value as the exposition format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _hist_lines(name: str, hist: _Histogram, labels: str) -> list[str]:
    sep = "," if labels else ""
    out = [f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {n}' for bound, n in zip(hist.buckets, hist.counts)]
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {hist.count}')
    suffix = f"{{{labels}}}" if labels else ""
    out.append(f"{name}_sum{suffix} {hist.total:.6f}")
    out.append(f"{name}_count{suffix} {hist.count}")
    return out
