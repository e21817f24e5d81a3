"""The operator's metrics in Prometheus's text format (``GET /metrics``).

``PrometheusTelemetry`` is the ``Telemetry`` the services report to: counters
and histograms in a registry of the app's own (never the library's global
one: two apps in one process, as tests make, must not share counts). Gauges of
the host's state (VMs by status, memory and vCPUs given to VMs, the warm pool,
webhook deliveries by status) are read from the store at each scrape, and what
the QEMU processes use (CPU time, resident memory) from ``/proc``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kiln.services.host_stats import HostSnapshot, HostStats
from kiln.services.states import VmStatus

# Creates take tens of milliseconds (pool) to seconds (cold boots under TCG).
CREATE_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
EXEC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
DELIVERY_STATUSES = ("pending", "succeeded", "failed")
AGENT_ERROR_KINDS = ("unreachable", "timeout", "internal", "outdated")


class PrometheusTelemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.creates = Counter(
            "kiln_vm_creates", "VM creates waited for, by path and outcome", ["path", "outcome"], registry=r
        )
        self.create_seconds = Histogram(
            "kiln_vm_create_seconds",
            "Time from request to a running VM, by path (pool, restore, cold)",
            ["path"],
            buckets=CREATE_BUCKETS,
            registry=r,
        )
        self.exec_seconds = Histogram(
            "kiln_exec_seconds",
            "Time of a command run in a guest, by language",
            ["language"],
            buckets=EXEC_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "kiln_admission_refusals", "Creates refused, by kind (quota, capacity)", ["kind"], registry=r
        )
        self.webhooks = Counter(
            "kiln_webhook_attempts",
            "Webhook delivery attempts, by outcome (succeeded, retried, failed)",
            ["outcome"],
            registry=r,
        )
        self.agent_errors = Counter(
            "kiln_agent_errors",
            "Guest agent failures, by kind (unreachable, timeout, internal, outdated)",
            ["kind"],
            registry=r,
        )
        for kind in AGENT_ERROR_KINDS:  # shown from the start, at 0
            self.agent_errors.labels(kind)
        self.vms = Gauge("kiln_vms", "VMs by status", ["status"], registry=r)
        self.vm_memory = Gauge("kiln_vm_memory_bytes", "Memory given to VMs that have a process", registry=r)
        self.vm_vcpus = Gauge("kiln_vm_vcpus", "vCPUs given to VMs that have a process", registry=r)
        self.pool_idle = Gauge("kiln_pool_idle_vms", "Idle VMs in the warm pool", registry=r)
        self.pool_size = Gauge("kiln_pool_target_vms", "The warm pool's target size (KILN_POOL_SIZE)", registry=r)
        self.deliveries = Gauge("kiln_webhook_deliveries", "Webhook deliveries by status", ["status"], registry=r)
        # A gauge, not a counter: it falls when a VM's process ends. rate() of it
        # between such ends is the CPU the VMs use.
        self.qemu_cpu = Gauge(
            "kiln_qemu_cpu_seconds", "CPU time (user + system) the live QEMU processes have used", registry=r
        )
        self.qemu_resident = Gauge(
            "kiln_qemu_resident_bytes", "Resident memory of the live QEMU processes (host memory in use)", registry=r
        )
        self.qemu_processes = Gauge("kiln_qemu_processes", "Live QEMU processes of this node", registry=r)

    # -- Telemetry

    def vm_create_finished(self, path: str, seconds: float, ok: bool) -> None:
        self.creates.labels(path, "ok" if ok else "failed").inc()
        if ok:
            self.create_seconds.labels(path).observe(seconds)

    def admission_refused(self, kind: str) -> None:
        self.refusals.labels(kind).inc()

    def exec_finished(self, language: str, seconds: float) -> None:
        self.exec_seconds.labels(language).observe(seconds)

    def webhook_outcome(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def agent_error(self, kind: str) -> None:
        self.agent_errors.labels(kind).inc()

    # -- the scrape

    def render(self, host: HostSnapshot) -> bytes:
        # Every status is shown, 0 included: a series that vanishes reads as "no data", not as none.
        for status in VmStatus:
            self.vms.labels(status.value).set(host.vms_by_status.get(status.value, 0))
        self.vm_memory.set(host.vm_memory_mb * 2**20)
        self.vm_vcpus.set(host.vm_vcpus)
        self.pool_idle.set(host.pool_idle)
        self.pool_size.set(host.pool_size)
        for delivery_status in DELIVERY_STATUSES:
            self.deliveries.labels(delivery_status).set(host.deliveries_by_status.get(delivery_status, 0))
        self.qemu_cpu.set(host.qemu_cpu_seconds)
        self.qemu_resident.set(host.qemu_resident_mb * 2**20)
        self.qemu_processes.set(host.qemu_processes)
        return generate_latest(self.registry)


@dataclass(frozen=True)
class Metrics:
    """What ``GET /metrics`` needs: the counters, the host's state, and who may read them."""

    telemetry: PrometheusTelemetry
    stats: HostStats
    # KILN_METRICS_TOKEN (empty: only the admin's credentials are accepted).
    token: str
