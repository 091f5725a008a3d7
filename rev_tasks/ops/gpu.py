"""GPU utilisation and memory of the GPUs a worker uses, read from NVML at scrape time.

Why: GPU workers should run between 15 and 80 % utilisation (``GpuBusy`` in
deploy/prometheus/alerts.yml), and the worker's own series (inference latency, RSS) cannot
show that. :class:`GpuCollector` reads NVML (``nvidia-ml-py``, the ``pynvml`` module) in the
worker's main process when Prometheus scrapes, so it needs nothing from the pool children
and nothing in multiprocess files.

On a machine without an NVIDIA driver (every CPU worker, the development machines) NVML's
library does not load: the first scrape tries once, the collector disables itself for the
life of the process and exports nothing, and later scrapes cost one attribute check.

Which GPUs: those named by ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-``/``MIG-`` UUIDs,
as ``rev worker --gpu N`` and the deploy files set it), else every GPU NVML sees. NVML
numbers GPUs in PCI bus order; CUDA's default order can differ on hosts with mixed GPUs,
so set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` there (inside a container given one GPU, both see
only that one, as index 0). The ``uuid`` label names the physical GPU either way.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

UTILIZATION = "gpu_utilization_ratio"
MEMORY_USED = "gpu_memory_used_bytes"
MEMORY_TOTAL = "gpu_memory_total_bytes"
#: The series this module exports (dashboards and alerts may use them).
GPU_METRIC_NAMES: frozenset[str] = frozenset({UTILIZATION, MEMORY_USED, MEMORY_TOTAL})
LABELS = ["gpu", "uuid", "name"]

#: CUDA_VISIBLE_DEVICES values that hide every GPU.
_NO_DEVICES = {"", "-1", "none", "nodevfiles", "void"}


def visible_devices(env: str | None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES``; None when unset (every GPU), [] for none.

    CUDA stops at the first invalid entry, so this does too.
    """
    if env is None:
        return None
    if env.strip().lower() in _NO_DEVICES:
        return []
    entries: list[str] = []
    for raw in env.split(","):
        entry = raw.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    return entries


class GpuCollector(Collector):
    """``gpu_utilization_ratio``, ``gpu_memory_used_bytes``, ``gpu_memory_total_bytes``.

    Labels: ``gpu`` (the index in this process's NVML view), ``uuid``, ``name``.
    ``nvml`` is the ``pynvml`` module (imported on first use) or a stand-in with the same
    functions; ``env`` is where ``CUDA_VISIBLE_DEVICES`` is read (the process environment).
    """

    def __init__(
        self, *, nvml: ModuleType | Any | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self._nvml = nvml
        self._visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
        self._state: str = "new"  # new -> ready | off
        self._lock = threading.Lock()

    def describe(self) -> list[Any]:
        """Nothing: registering must not initialise NVML (no GPU, no cost)."""
        return []

    @property
    def enabled(self) -> bool | None:
        """True/False once NVML was tried, None before the first scrape."""
        return {"new": None, "ready": True, "off": False}[self._state]

    def _init(self) -> bool:
        with self._lock:
            if self._state == "new":
                self._state = "ready" if self._start() else "off"
        return self._state == "ready"

    def _start(self) -> bool:
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no library, no driver: no GPU metrics
            log.debug("no GPU metrics: NVML unavailable (%s)", exc)
            return False
        return True

    def _handles(self) -> Iterator[tuple[str, Any]]:
        nvml = self._nvml
        wanted = visible_devices(self._visible)
        if wanted is None:
            wanted = [str(i) for i in range(nvml.nvmlDeviceGetCount())]
        for entry in wanted:
            try:
                if entry.isdigit():
                    yield entry, nvml.nvmlDeviceGetHandleByIndex(int(entry))
                else:
                    handle = nvml.nvmlDeviceGetHandleByUUID(entry)
                    yield str(nvml.nvmlDeviceGetIndex(handle)), handle
            except nvml.NVMLError as exc:
                log.warning("GPU %s not readable through NVML: %s", entry, exc)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._state == "off" or not self._init():
            return
        nvml = self._nvml
        util = GaugeMetricFamily(
            UTILIZATION,
            "Fraction of the last sample period in which a kernel ran on the GPU (NVML).",
            labels=LABELS,
        )
        used = GaugeMetricFamily(MEMORY_USED, "GPU memory in use (NVML), bytes.", labels=LABELS)
        total = GaugeMetricFamily(MEMORY_TOTAL, "GPU memory installed, bytes.", labels=LABELS)
        try:
            handles = list(self._handles())
        except nvml.NVMLError as exc:
            log.warning("GPU metrics skipped: %s", exc)
            return
        for index, handle in handles:
            try:
                labels = [index, nvml.nvmlDeviceGetUUID(handle), nvml.nvmlDeviceGetName(handle)]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:  # e.g. GPU lost: the other GPUs still report
                log.warning("GPU %s skipped: %s", index, exc)
                continue
            used.add_metric(labels, float(memory.used))
            total.add_metric(labels, float(memory.total))
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            except nvml.NVMLError:  # not supported on MIG instances: memory only
                continue
            util.add_metric(labels, rates.gpu / 100.0)
        for family in (util, used, total):
            if family.samples:
                yield family
