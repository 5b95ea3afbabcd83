"""Prometheus metrics of one app: requests by route and status, latency histogram, errors,
thumbnail cache. Each app has its own registry, so several apps (tests) never clash."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vlsearch.core.cache import ByteLRU

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vlsearch_requests", "HTTP requests served", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("vlsearch_request_seconds", "Request latency (seconds)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("vlsearch_errors", "Requests answered with a 4xx/5xx status", ["route", "status"],
                              registry=self.registry)
        self.in_flight = Gauge("vlsearch_requests_in_flight", "Requests being served", registry=self.registry)

    def cache_gauges(self, cache: ByteLRU) -> None:
        """Expose the thumbnail cache's size in bytes and its hit/miss counts."""
        for name, doc, fn in (("bytes", "bytes held", lambda: cache.nbytes), ("hits", "hits", lambda: cache.hits),
                              ("misses", "misses", lambda: cache.misses)):
            Gauge(f"vlsearch_thumbnail_cache_{name}", f"Thumbnail cache {doc}", registry=self.registry).set_function(fn)


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by its route template."""

    def __init__(self, app: Callable, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        start = time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(route, str(status)).inc()
