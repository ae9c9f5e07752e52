"""The head's Prometheus metrics: one collector reading the :class:`Observer`'s views.

Served as Prometheus text at ``GET /nbcluster/metrics`` by the Jupyter server extension (behind
its authentication) and, for a standalone head started with ``--metrics-port``, by
:mod:`nbcluster.head.metrics_http`. Every metric name starts with ``nbcluster_``;
docs/operations.md lists them and docs/grafana/nbcluster.json charts them.

Each scrape builds its families from the head's state at that moment (a custom
:class:`prometheus_client.registry.Collector` in a registry of its own: nothing is added to
``prometheus_client``'s global registry, so several heads in one process do not mix). The
collector must run on the head's event loop, which owns that state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from nbcluster.head.observe import FINISHED, INFEASIBLE, LEASE_WAIT_BUCKETS, QUEUED, RUNNING
from nbcluster.protocol.messages import ALIVE

if TYPE_CHECKING:
    from nbcluster.head.observe import Observer

#: The ``Content-Type`` of the exposition (Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NODE = ["node_id", "node"]


class HeadCollector(Collector):
    """Collects the cluster's metrics from ``observe`` on each scrape."""

    def __init__(self, observe: Observer) -> None:
        self.observe = observe

    def collect(self) -> Iterator[Metric]:
        yield from self._head()
        yield from self._nodes()
        yield from self._tasks()
        yield from self._actors()

    def _head(self) -> Iterator[Metric]:
        obs = self.observe
        info = GaugeMetricFamily(
            "nbcluster_head_info",
            "The head: its version and address",
            labels=["version", "address"],
        )
        info.add_metric([obs.version, obs.address], 1)
        yield info
        yield GaugeMetricFamily(
            "nbcluster_head_start_time_seconds",
            "When the head started (Unix time)",
            value=obs.started_at,
        )
        waits = obs.lease_waits
        buckets: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip([*map(str, LEASE_WAIT_BUCKETS), "+Inf"], waits.counts, strict=True):
            acc += n
            buckets.append((bound, acc))
        lease = HistogramMetricFamily(
            "nbcluster_lease_wait_seconds",
            "Time from a lease request (a task's or an actor's worker) to its grant",
        )
        lease.add_metric([], buckets, sum_value=waits.total)
        yield lease

    def _nodes(self) -> Iterator[Metric]:
        views = self.observe.node_views()
        nodes = GaugeMetricFamily("nbcluster_nodes", "Nodes by state", labels=["state"])
        for state in ("alive", "draining", "dead"):
            nodes.add_metric([state], sum(1 for n in views if n.state == state))
        yield nodes

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*_NODE, *(extra or [])])

        res_total = GaugeMetricFamily(
            "nbcluster_resources_total", "Resources of the alive nodes", labels=["resource"]
        )
        res_used = GaugeMetricFamily(
            "nbcluster_resources_used",
            "Resources held by leases (total - available)",
            labels=["resource"],
        )
        node_total = gauge("nbcluster_node_resources_total", "A node's resources", ["resource"])
        node_used = gauge("nbcluster_node_resources_used", "A node's held resources", ["resource"])
        cpu = gauge("nbcluster_node_cpu_percent", "Host CPU utilisation (percent)")
        mem_used = gauge("nbcluster_node_memory_used_bytes", "Host memory in use")
        mem_total = gauge("nbcluster_node_memory_total_bytes", "Host memory")
        gpu_util = gauge("nbcluster_node_gpu_utilization_percent", "GPU utilisation", ["gpu"])
        gpu_used = gauge("nbcluster_node_gpu_memory_used_bytes", "GPU memory in use", ["gpu"])
        gpu_total = gauge("nbcluster_node_gpu_memory_total_bytes", "GPU memory", ["gpu"])
        workers = gauge("nbcluster_node_workers", "Worker processes of a node")
        leases = gauge("nbcluster_node_leases", "Workers leased (busy)")
        running = gauge("nbcluster_node_tasks_running", "Tasks running on a node")
        store_cap = gauge("nbcluster_object_store_capacity_bytes", "Object store memory capacity")
        store_used = gauge("nbcluster_object_store_used_bytes", "Object store memory in use")
        spilled = gauge("nbcluster_object_store_spilled_bytes", "Object bytes spilled to disk")
        objects = gauge("nbcluster_object_store_objects", "Objects in the store")
        sent = CounterMetricFamily(
            "nbcluster_object_store_sent_bytes", "Object bytes sent to other nodes", labels=_NODE
        )
        received = CounterMetricFamily(
            "nbcluster_object_store_received_bytes",
            "Object bytes pulled from other nodes",
            labels=_NODE,
        )
        totals: dict[str, list[float]] = {}
        for n in views:
            if not n.alive:
                continue  # a dead node's last figures would look current
            lab = [n.node_id, n.name]
            for key, total in n.resources_total.items():
                free = n.resources_available.get(key, 0.0)
                node_total.add_metric([*lab, key], total)
                node_used.add_metric([*lab, key], max(0.0, total - free))
                t = totals.setdefault(key, [0.0, 0.0])
                t[0] += total
                t[1] += max(0.0, total - free)
            workers.add_metric(lab, n.workers)
            leases.add_metric(lab, n.leases)
            running.add_metric(lab, n.tasks_running)
            m = n.metrics
            if m is not None:
                cpu.add_metric(lab, m.cpu_percent)
                mem_used.add_metric(lab, m.memory_used)
                mem_total.add_metric(lab, m.memory_total)
                for g in m.gpus:
                    gl = [*lab, str(g.index)]
                    gpu_util.add_metric(gl, g.utilization)
                    gpu_used.add_metric(gl, g.memory_used)
                    gpu_total.add_metric(gl, g.memory_total)
            s = n.object_store
            if s is not None:
                store_cap.add_metric(lab, s.capacity)
                store_used.add_metric(lab, s.used)
                spilled.add_metric(lab, s.spilled)
                objects.add_metric(lab, s.objects)
                sent.add_metric(lab, s.bytes_out)
                received.add_metric(lab, s.bytes_in)
        for key, (total, used) in sorted(totals.items()):
            res_total.add_metric([key], total)
            res_used.add_metric([key], round(used, 6))
        yield from (res_total, res_used, node_total, node_used, cpu, mem_used, mem_total)
        yield from (gpu_util, gpu_used, gpu_total, workers, leases, running)
        yield from (store_cap, store_used, spilled, objects, sent, received)

    def _tasks(self) -> Iterator[Metric]:
        obs = self.observe
        active = GaugeMetricFamily(
            "nbcluster_tasks",
            "Tasks now queued, running or infeasible, by function",
            labels=["state", "function"],
        )
        counts: dict[tuple[str, str], int] = {}
        lacking: dict[tuple[tuple[str, float], ...], bool] = {}  # one check per resource shape
        for t in obs.tasks.values():
            state: str = t.state
            if state == QUEUED:
                shape = tuple(sorted(t.resources.items()))
                if shape not in lacking:
                    lacking[shape] = bool(obs.state.missing_resources(t.resources))
                state = INFEASIBLE if lacking[shape] else QUEUED
            counts[(state, t.name)] = counts.get((state, t.name), 0) + 1
        for state in (QUEUED, RUNNING, INFEASIBLE):  # each state present, even at zero
            if not any(s == state for s, _ in counts):
                counts[(state, "")] = 0
        for (state, name), n in sorted(counts.items()):
            active.add_metric([state, name], n)
        yield active
        ended = CounterMetricFamily(
            "nbcluster_tasks_ended",
            "Tasks ended since the head started, by final state and function",
            labels=["state", "function"],
        )
        if not obs.ended_counts[FINISHED]:
            ended.add_metric([FINISHED, ""], 0)
        for state, by_function in obs.ended_counts.items():
            for name, n in sorted(by_function.items()):
                ended.add_metric([state, name], n)
        yield ended

    def _actors(self) -> Iterator[Metric]:
        views = self.observe.actor_views()
        by_state = GaugeMetricFamily(
            "nbcluster_actors", "Actors by state and class", labels=["state", "class_name"]
        )
        counts: dict[tuple[str, str], int] = {}
        restarts: dict[str, int] = {}
        for a in views:
            counts[(a.state, a.class_name)] = counts.get((a.state, a.class_name), 0) + 1
            restarts[a.class_name] = restarts.get(a.class_name, 0) + a.restarts
        if not counts:
            counts[(ALIVE.lower(), "")] = 0
        for (state, cls), n in sorted(counts.items()):
            by_state.add_metric([state, cls], n)
        yield by_state
        restart = CounterMetricFamily(
            "nbcluster_actor_restarts",
            "Actor restarts (after their worker or node died), by class",
            labels=["class_name"],
        )
        for cls, n in sorted(restarts.items()) or [("", 0)]:
            restart.add_metric([cls], n)
        yield restart
        groups = GaugeMetricFamily(
            "nbcluster_placement_groups", "Placement groups by state", labels=["state"]
        )
        gcount: dict[str, int] = {}
        for g in self.observe.placement_group_views():
            gcount[g.state] = gcount.get(g.state, 0) + 1
        for state in ("PENDING", "CREATED", "RESCHEDULING", "REMOVED"):
            groups.add_metric([state], gcount.get(state, 0))
        yield groups


def exposition(observe: Observer) -> bytes:
    """The head's metrics in the Prometheus text format (from a registry of its own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HeadCollector(observe))
    return generate_latest(registry)
