"""`GET /metrics`: the daemon in Prometheus' text format.

Two kinds of numbers, each from the one place that knows it:
- read at scrape time (a collector, never a counter that could drift from the truth): jobs by folder
  and state and the age of each folder's oldest queued job from the journal, resident models and
  their load time from the model registry, device memory from torch;
- observed in this process as things happen: audio seconds processed and the real-time factor of
  each job (the worker's `on_published` hook), HTTP requests by route template and status.

Every app gets its own CollectorRegistry (never prometheus-client's global one), so tests and
several apps in one process never register a metric twice.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match

from daemon.config import Config
from daemon.journal import Job, JobState, Journal
from daemon.models import ModelRegistry

# Processing wall time / audio seconds: a GPU does far better than 1 (0.01–0.1), a small CPU near
# or above it; the buckets span both, and a file slower than 10x real time is a problem to see.
REAL_TIME_FACTOR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
UNMATCHED_ROUTE = "<unmatched>"  # every path no route serves shares one label: raw paths are unbounded


class DaemonCollector(Collector):
    """Reads the journal, the model registry and torch at each scrape."""

    def __init__(self, config: Callable[[], Config], journal: Journal, models: ModelRegistry,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.journal = journal
        self.models = models
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        """Yield the journal's, the models' and the device's gauges as they are now."""
        yield from self._jobs()
        yield from self._models()
        yield from self._device_memory()

    def _jobs(self) -> Iterator[Metric]:
        counts = self.journal.counts()
        configured = self.config().folders
        # Folders removed from the config but still in the journal keep their series until pruned.
        folders = list(configured) + [name for name in counts if name not in configured]
        jobs = GaugeMetricFamily("whisperd_jobs", "Jobs in the journal by folder and state (finished jobs until "
                                 "the retention prunes them)", labels=["folder", "state"])
        for folder in folders:
            for state in JobState:  # every state, zeros included: an alert on a series needs it to exist
                jobs.add_metric([folder, state.value], counts.get(folder, {}).get(state.value, 0))
        yield jobs
        now = self.clock()
        oldest: dict[str, float] = {}
        for job in self.journal.jobs([JobState.QUEUED]):
            oldest[job.folder] = min(oldest.get(job.folder, job.created_at), job.created_at)
        age = GaugeMetricFamily("whisperd_queue_oldest_age_seconds", "Age of the oldest queued job per folder "
                                "(0: none queued); retries waiting for their time are not counted",
                                labels=["folder"])
        for folder in folders:
            age.add_metric([folder], max(now - oldest[folder], 0.0) if folder in oldest else 0.0)
        yield age

    def _models(self) -> Iterator[Metric]:
        load = GaugeMetricFamily("whisperd_model_load_seconds", "How long the resident model took to load "
                                 "(download or conversion included)", labels=["model", "device", "origin"])
        resident = GaugeMetricFamily("whisperd_model_resident_bytes", "Memory the resident model's weights take",
                                     labels=["model", "device"])
        for info in self.models.info():
            load.add_metric([info.name, info.device, info.origin], info.duration_s)
            resident.add_metric([info.name, info.device], info.nbytes)
        yield load
        yield resident

    def _device_memory(self) -> Iterator[Metric]:
        # torch is loaded by the model registry already; on a CPU the process_* metrics say the memory.
        torch: Any = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        allocated = GaugeMetricFamily("whisperd_cuda_memory_allocated_bytes", "GPU memory held by tensors",
                                      labels=["device"])
        reserved = GaugeMetricFamily("whisperd_cuda_memory_reserved_bytes", "GPU memory reserved by torch's "
                                     "caching allocator", labels=["device"])
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
            reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved


class Metrics:
    """The app's metrics: one registry, the in-process observations, and the scrape-time collector."""

    def __init__(self, config: Callable[[], Config], journal: Journal, models: ModelRegistry,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        # The standard process_* (memory, CPU, file descriptors) and python_* metrics, on this registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(DaemonCollector(config, journal, models, clock))
        self.audio_seconds = Counter("whisperd_audio_processed_seconds", "Seconds of audio transcribed or "
                                     "translated by this process", ["folder"], registry=self.registry)
        self.real_time_factor = Histogram(
            "whisperd_job_real_time_factor", "A finished job's processing wall time divided by its audio "
            "duration (below 1: faster than real time)", ["folder"], buckets=REAL_TIME_FACTOR_BUCKETS,
            registry=self.registry)
        self.http_requests = Counter("whisperd_http_requests", "HTTP requests answered, by route template and "
                                     "status", ["route", "status"], registry=self.registry)

    def job_published(self, job: Job, audio_s: float, timings: Mapping[str, float]) -> None:
        """Record a job whose outputs were published: its audio, and its wall time (every stage) per
        audio second. The worker's `on_published` hook calls it, on the worker's thread."""
        if audio_s <= 0:  # a file with no audio has no real-time factor
            return
        self.audio_seconds.labels(job.folder).inc(audio_s)
        self.real_time_factor.labels(job.folder).observe(sum(timings.values()) / audio_s)

    def exposition(self) -> bytes:
        """Return every metric in Prometheus' text format."""
        return generate_latest(self.registry)


def route_template(routes: Iterable[BaseRoute], scope: dict[str, Any]) -> str:
    """Return the template of the route that serves a request (`/v1/audio/transcriptions`), never its raw path."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", UNMATCHED_ROUTE))
        if match == Match.PARTIAL and partial is None:  # the path matches, the method does not (405)
            partial = str(getattr(route, "path", UNMATCHED_ROUTE))
    return partial or UNMATCHED_ROUTE


class RequestMetrics:
    """ASGI middleware: counts every HTTP response by route template and status.

    It wraps the token check, so refusals (401) are counted too; the body limit wraps the whole app
    and answers 413 outside it, so those are not.
    """

    def __init__(self, app: Any, metrics: Metrics, routes: Callable[[], Iterable[BaseRoute]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started is a server error

        async def watched(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            self.metrics.http_requests.labels(route_template(self.routes(), scope), str(status)).inc()


def add_metrics_route(app: FastAPI, metrics: Metrics) -> None:
    """Serve `/metrics` (on the app itself: an included router's routes are not in `app.routes` to match)."""

    @app.get("/metrics", include_in_schema=False)
    async def scrape(_request: Request) -> Response:
        """Prometheus' scrape: every metric, read now (the journal on a thread: it may wait on a lock)."""
        return Response(await run_in_threadpool(metrics.exposition), media_type=CONTENT_TYPE_LATEST)
