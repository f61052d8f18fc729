"""A minimal Prometheus text-format (0.0.4) exposition: counters, gauges and histograms, thread-safe."""
from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = labels + extra
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in items) + "}" if items else ""


def _num(v: float) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_: str, labelnames: Iterable[str] = ()):
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        return tuple((k, str(labels[k])) for k in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge read from a callback at scrape time (returning {labels: value} or a number)."""
    kind = "gauge"

    def __init__(self, name: str, help_: str, read: Callable[[], float | dict[Labels, float]],
                 labelnames: Iterable[str] = ()):
        super().__init__(name, help_, labelnames)
        self.read = read

    def render(self) -> list[str]:
        val = self.read()
        items = sorted(val.items()) if isinstance(val, dict) else [((), float(val))]
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, buckets: Iterable[float], labelnames: Iterable[str] = ()):
        super().__init__(name, help_, labelnames)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._data: dict[Labels, tuple[list[int], float, int]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total, n = self._data.get(key, ([0] * len(self.buckets), 0.0, 0))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
            self._data[key] = (counts, total + value, n + 1)

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, (list(c), t, n)) for k, (c, t, n) in self._data.items())
        for key, (counts, total, n) in items:
            for b, c in zip(self.buckets, counts, strict=True):
                lines.append(f"{self.name}_bucket{_fmt_labels(key, (('le', _num(b)),))} {c}")
            lines.append(f"{self.name}_sum{_fmt_labels(key)} {_num(total)}")
            lines.append(f"{self.name}_count{_fmt_labels(key)} {n}")
        return lines


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines += m.render()  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"


class ServiceMetrics:
    """The service's metrics; gauges read live state through the callbacks given."""

    def __init__(self, job_counts: Callable[[], dict[str, int]], ready: Callable[[], bool]):
        r = self.registry = Registry()
        self.requests = r.add(Counter("wbmri_http_requests_total", "HTTP requests answered, by route and status code",
                                      ("method", "route", "status")))
        self.request_seconds = r.add(Histogram("wbmri_http_request_duration_seconds", "HTTP request duration",
                                               (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                               ("route",)))
        self.uploads_rejected = r.add(Counter("wbmri_uploads_rejected_total", "uploads refused, by HTTP status",
                                              ("status",)))
        self.jobs_finished = r.add(Counter("wbmri_jobs_finished_total", "jobs finished, by final state", ("state",)))
        self.job_failures = r.add(Counter("wbmri_job_failures_total",
                                          "failed jobs by reason (input, timeout, crash, error)", ("reason",)))
        self.job_seconds = r.add(Histogram("wbmri_job_duration_seconds", "time from start to finish of a job",
                                           (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800), ()))
        self.queue_wait_seconds = r.add(Histogram("wbmri_job_queue_wait_seconds", "time a job waited in the queue",
                                                  (0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800), ()))
        self.worker_restarts = r.add(Counter("wbmri_worker_restarts_total", "inference worker processes restarted",
                                             ("reason",)))

        def by_state() -> dict[Labels, float]:
            return {(("state", k),): float(v) for k, v in job_counts().items()}

        r.add(Gauge("wbmri_jobs", "jobs in the store by state", by_state, ("state",)))
        r.add(Gauge("wbmri_queue_length", "jobs waiting to start", lambda: float(job_counts().get("queued", 0))))
        r.add(Gauge("wbmri_ready", "1 when the model is loaded and the service accepts studies",
                    lambda: 1.0 if ready() else 0.0))

    def render(self) -> str:
        return self.registry.render()
