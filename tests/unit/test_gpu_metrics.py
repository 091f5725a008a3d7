"""rev_tasks.ops.gpu: GPU series from NVML, and nothing at all without a GPU.

The no-GPU path runs for real: the real ``pynvml`` on a machine without an NVIDIA driver.
The shape of the series is tested with a stand-in for NVML at its call boundary (the
functions of the ``pynvml`` module), since these machines have no GPU; on a machine with
one, ``test_real_gpus_are_exported`` reads the real devices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rev_tasks.ops import gpu

pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed")


def _driver_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def _exposition(collector: gpu.GpuCollector) -> dict[str, list[tuple[dict[str, str], float]]]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }


# --------------------------------------------------------------------------- no GPU, for real
@pytest.mark.skipif(_driver_present(), reason="this machine has an NVIDIA driver")
def test_without_a_driver_nothing_is_exported_and_nvml_is_tried_once() -> None:
    collector = gpu.GpuCollector(env={})
    registry = CollectorRegistry()  # auto_describe: registering must not touch NVML
    registry.register(collector)
    assert collector.enabled is None
    assert b"gpu_" not in generate_latest(registry)
    assert collector.enabled is False
    start = time.perf_counter()
    for _ in range(1000):
        assert list(collector.collect()) == []
    assert time.perf_counter() - start < 0.05  # disabled: no library load per scrape


def test_the_worker_registry_carries_it_without_a_gpu() -> None:
    """Beside the worker's own collectors (rev_tasks.metrics.build_registry)."""
    from rev_tasks import metrics

    registry = metrics.build_registry([gpu.GpuCollector(nvml=_FakeNvml(init_error=True))])
    text = generate_latest(registry).decode()
    assert "gpu_" not in text


# --------------------------------------------------------------------------- NVML stand-in
class _NVMLError(Exception):
    pass


@dataclass
class _Device:
    uuid: str
    name: str = "NVIDIA H200"
    util: int = 42
    used: int = 30 * 2**30
    total: int = 141 * 2**30
    mig: bool = False
    lost: bool = False


@dataclass
class _Mem:
    total: int
    free: int
    used: int


@dataclass
class _Util:
    gpu: int
    memory: int


@dataclass
class _FakeNvml:
    """The ``pynvml`` functions GpuCollector calls, over a list of devices."""

    devices: list[_Device] = field(default_factory=list)
    init_error: bool = False
    calls: list[str] = field(default_factory=list)
    NVMLError: type[Exception] = _NVMLError

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error:
            raise _NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Device:
        if not 0 <= index < len(self.devices):
            raise _NVMLError("Invalid Argument")
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> _Device:
        for d in self.devices:
            if d.uuid == uuid:
                return d
        raise _NVMLError("Not Found")

    def nvmlDeviceGetIndex(self, handle: _Device) -> int:
        return self.devices.index(handle)

    def nvmlDeviceGetUUID(self, handle: _Device) -> str:
        if handle.lost:
            raise _NVMLError("GPU is lost")
        return handle.uuid

    def nvmlDeviceGetName(self, handle: _Device) -> str:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: _Device) -> _Mem:
        return _Mem(total=handle.total, free=handle.total - handle.used, used=handle.used)

    def nvmlDeviceGetUtilizationRates(self, handle: _Device) -> _Util:
        if handle.mig:
            raise _NVMLError("Not Supported")
        return _Util(gpu=handle.util, memory=10)


def _two_gpus(**second: Any) -> _FakeNvml:
    return _FakeNvml(devices=[_Device("GPU-aaaa", util=42), _Device("GPU-bbbb", util=90, **second)])


def test_every_visible_gpu_is_exported_with_its_labels() -> None:
    nvml = _two_gpus()
    series = _exposition(gpu.GpuCollector(nvml=nvml, env={}))
    assert set(series) == gpu.GPU_METRIC_NAMES
    util = {labels["uuid"]: value for labels, value in series[gpu.UTILIZATION]}
    assert util == {"GPU-aaaa": 0.42, "GPU-bbbb": 0.90}
    labels, used = series[gpu.MEMORY_USED][0]
    assert labels == {"gpu": "0", "uuid": "GPU-aaaa", "name": "NVIDIA H200"}
    assert used == 30 * 2**30
    assert series[gpu.MEMORY_TOTAL][1] == (
        {"gpu": "1", "uuid": "GPU-bbbb", "name": "NVIDIA H200"},
        141 * 2**30,
    )


@pytest.mark.parametrize(
    ("visible", "uuids"),
    [
        ("1", ["GPU-bbbb"]),
        ("GPU-bbbb", ["GPU-bbbb"]),
        ("0,1", ["GPU-aaaa", "GPU-bbbb"]),
        ("", []),
        ("-1", []),
        ("1,x,0", ["GPU-bbbb"]),  # CUDA stops at the first invalid entry
    ],
)
def test_only_the_gpus_cuda_visible_devices_names(visible: str, uuids: list[str]) -> None:
    collector = gpu.GpuCollector(nvml=_two_gpus(), env={"CUDA_VISIBLE_DEVICES": visible})
    series = _exposition(collector)
    got = [labels["uuid"] for labels, _ in series.get(gpu.MEMORY_USED, [])]
    assert got == uuids
    if not uuids:
        assert series == {}


def test_a_uuid_entry_is_labelled_with_its_nvml_index() -> None:
    collector = gpu.GpuCollector(nvml=_two_gpus(), env={"CUDA_VISIBLE_DEVICES": "GPU-bbbb"})
    ((labels, _),) = _exposition(collector)[gpu.MEMORY_USED]
    assert labels["gpu"] == "1"


def test_a_mig_instance_reports_memory_only() -> None:
    series = _exposition(gpu.GpuCollector(nvml=_two_gpus(mig=True), env={}))
    assert [labels["uuid"] for labels, _ in series[gpu.UTILIZATION]] == ["GPU-aaaa"]
    assert len(series[gpu.MEMORY_USED]) == 2


def test_a_lost_gpu_does_not_hide_the_others() -> None:
    series = _exposition(gpu.GpuCollector(nvml=_two_gpus(lost=True), env={}))
    assert [labels["uuid"] for labels, _ in series[gpu.MEMORY_USED]] == ["GPU-aaaa"]


def test_an_unknown_index_is_skipped() -> None:
    collector = gpu.GpuCollector(nvml=_two_gpus(), env={"CUDA_VISIBLE_DEVICES": "0,7"})
    assert len(_exposition(collector)[gpu.MEMORY_USED]) == 1


def test_nvml_failing_to_start_disables_the_collector_once() -> None:
    nvml = _FakeNvml(devices=[_Device("GPU-aaaa")], init_error=True)
    collector = gpu.GpuCollector(nvml=nvml, env={})
    for _ in range(3):
        assert _exposition(collector) == {}
    assert nvml.calls == ["init"]
    assert collector.enabled is False


def test_visible_devices_parsing() -> None:
    assert gpu.visible_devices(None) is None
    assert gpu.visible_devices(" 0, 2 ") == ["0", "2"]
    assert gpu.visible_devices("MIG-1234,GPU-5") == ["MIG-1234", "GPU-5"]
    assert gpu.visible_devices("NoDevFiles") == []


# --------------------------------------------------------------------------- a real GPU
@pytest.mark.gpu
@pytest.mark.skipif(not _driver_present(), reason="no NVIDIA driver on this machine")
def test_real_gpus_are_exported() -> None:
    series = _exposition(gpu.GpuCollector(env={}))
    pynvml.nvmlInit()
    count = pynvml.nvmlDeviceGetCount()
    assert len(series[gpu.MEMORY_TOTAL]) == count >= 1
    for labels, value in series[gpu.MEMORY_TOTAL]:
        assert value > 2**30 and labels["uuid"].startswith(("GPU-", "MIG-"))
    for _, value in series.get(gpu.UTILIZATION, []):
        assert 0.0 <= value <= 1.0


# --------------------------------------------------------------------------- the worker server
@pytest.mark.parametrize(("device", "exported"), [("cuda", True), ("cpu", False)])
def test_only_a_cuda_worker_serves_gpu_series(
    monkeypatch: pytest.MonkeyPatch, device: str, exported: bool
) -> None:
    """start_worker_metrics_server registers GpuCollector for REV_WORKER_DEVICE=cuda only
    (NVML stood in for at its call boundary: this machine has no GPU)."""
    import urllib.request

    from rev_tasks import metrics
    from rev_tasks.settings import reset_settings

    monkeypatch.setenv("REV_WORKER_DEVICE", device)
    monkeypatch.setenv("REV_BACKUP_DIR", "")
    monkeypatch.setattr(metrics, "GpuCollector", lambda: gpu.GpuCollector(nvml=_two_gpus(), env={}))
    reset_settings()
    started = metrics.start_worker_metrics_server(0, "127.0.0.1")
    assert started is not None
    server, _ = started
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.shutdown()
        monkeypatch.undo()
        reset_settings()
    assert (gpu.UTILIZATION in text) is exported
    assert "worker_memory_bytes" in text
    assert gpu.GPU_METRIC_NAMES <= metrics.METRIC_NAMES  # dashboards and alerts may name them
