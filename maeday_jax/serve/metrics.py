"""The service's Prometheus metrics, in a registry of its own per app (several apps, as in
the tests, never collide in the process-wide default registry).

  maeday_serve_requests_total{status}         answers of POST /score by HTTP status
  maeday_serve_request_seconds                POST /score latency, arrival to answer
  maeday_serve_batch_size                     images per model call (before padding)
  maeday_serve_batch_seconds                  model time per call
  maeday_serve_errors_total{kind}             refusals and failures by kind
  maeday_serve_pending                        requests admitted and not yet answered
"""

from __future__ import annotations

from prometheus_client import (
  CONTENT_TYPE_LATEST,
  CollectorRegistry,
  Counter,
  Gauge,
  Histogram,
  generate_latest,
)

# Latencies from a millisecond (a warm GPU batch) to a minute (a CPU under load).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
  """The counters and histograms of one app."""

  content_type = CONTENT_TYPE_LATEST

  def __init__(self, max_batch: int):
    self.registry = CollectorRegistry()
    registry = self.registry
    self.requests = Counter(
      "maeday_serve_requests", "POST /score answers by HTTP status", ["status"], registry=registry
    )
    self.latency = Histogram(
      "maeday_serve_request_seconds",
      "POST /score latency (arrival to answer)",
      buckets=LATENCY_BUCKETS,
      registry=registry,
    )
    sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
    self.batch_size = Histogram(
      "maeday_serve_batch_size",
      "images per model call (before padding to the compiled batch)",
      buckets=[b for b in sizes if b <= max_batch],
      registry=registry,
    )
    self.batch_seconds = Histogram(
      "maeday_serve_batch_seconds",
      "model time per batch",
      buckets=LATENCY_BUCKETS,
      registry=registry,
    )
    self.errors = Counter(
      "maeday_serve_errors", "refused or failed requests by kind", ["kind"], registry=registry
    )
    self.pending = Gauge(
      "maeday_serve_pending", "requests admitted and not yet answered", registry=registry
    )

  def answered(self, status: int, seconds: float) -> None:
    """Counts one POST /score answer."""
    self.requests.labels(status=str(status)).inc()
    self.latency.observe(seconds)

  def error(self, kind: str) -> None:
    """Counts one refusal or failure of `kind`."""
    self.errors.labels(kind=kind).inc()

  def batch(self, size: int, seconds: float) -> None:
    """Counts one model call of `size` images."""
    self.batch_size.observe(size)
    self.batch_seconds.observe(seconds)

  def text(self) -> bytes:
    """The Prometheus text exposition of this app's metrics."""
    return generate_latest(self.registry)
