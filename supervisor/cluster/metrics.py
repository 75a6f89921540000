"""The cluster's metrics, registered only on a node of a cluster (see ``METRIC_DOCS``).

The ``node`` label appears on one series only (``cluster_node_info``), whose cardinality is
the number of nodes; per-agent series carry no node label (Prometheus' ``instance`` tells
the nodes apart).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from supervisor.metrics import METRIC_DOCS, Metrics

__all__ = ["ClusterMetrics"]

_DOCS = {d.name: d for d in METRIC_DOCS}
_P = "agent_supervisor_cluster_"
CLAIM_RESULTS = ("won", "elsewhere", "overlap", "failed")


class ClusterMetrics:
    """The ``agent_supervisor_cluster_*`` families, on the registry of ``metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry

        def gauge(short: str) -> Gauge:
            doc = _DOCS[_P + short]
            return Gauge(doc.name, doc.help, doc.labels, registry=registry)

        def counter(short: str) -> Counter:
            doc = _DOCS[_P + short]
            return Counter(doc.name, doc.help, doc.labels, registry=registry)

        doc = _DOCS[_P + "claim_seconds"]
        self._claim_s = Histogram(
            doc.name, doc.help, doc.labels, registry=registry, buckets=doc.buckets
        )
        self._info = gauge("node_info")
        self._claims = counter("claims_total")
        self._abandoned = counter("abandoned_total")
        self._takeovers = counter("takeovers_total")
        self._lost = counter("lease_lost_total")
        self._errors = counter("errors_total")
        self._live = gauge("live_nodes")
        self._mismatch = gauge("config_mismatch_nodes")
        for result in CLAIM_RESULTS:
            self._claims.labels(result)
        for op in ("heartbeat", "check"):
            self._errors.labels(op)

    def joined(self, node: str, config_hash: str) -> None:
        self._info.clear()
        self._info.labels(node, config_hash).set(1)

    def claim(self, result: str, seconds: float | None) -> None:
        self._claims.labels(result).inc()
        if seconds is not None:
            self._claim_s.observe(seconds)

    def abandoned(self) -> None:
        self._abandoned.inc()

    def takeover(self) -> None:
        self._takeovers.inc()

    def lease_lost(self) -> None:
        self._lost.inc()

    def error(self, op: str) -> None:
        self._errors.labels(op).inc()

    def nodes(self, live: int, mismatched: int) -> None:
        self._live.set(live)
        self._mismatch.set(mismatched)
