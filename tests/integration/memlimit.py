"""Kernel-enforced memory limits for a process tree (a worker and its pool children).

The memory-limited worker test starts a worker the way an operator's container or systemd
unit would: with a limit the kernel enforces on the whole worker, main process and children
together. That is a memory cgroup; this helper makes one below the test process's own cgroup
(v2 ``memory.max``, or v1 ``memory.limit_in_bytes`` with the swap limit set too, so that swap
cannot stand in for memory). Where no cgroup can be created (no write access, v2 without a
delegated memory controller) only the second limit applies.

The second limit is ``RLIMIT_DATA``, always set, per process: it caps private writable memory.
A cgroup alone does not make an in-memory load of fp32 safetensors fail reliably: transformers
maps the weight file, and the kernel may evict and re-read those clean file pages under the
cgroup's limit rather than kill the process (we saw both outcomes for the same load). The
private writable mapping of the whole file is refused outright under ``RLIMIT_DATA``.

``preexec`` is passed as ``preexec_fn`` to ``subprocess.Popen``: it runs in the child after
fork and before exec, so every process the worker forks later inherits the limit.
"""

from __future__ import annotations

import contextlib
import os
import resource
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroups() -> dict[str, str]:
    """``{"memory": "/a/b"}`` (v1 controller paths) and ``{"": "/x"}`` (the v2 path)."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


class MemoryLimit:
    """Create the limit (``mechanism`` says which); ``close()`` removes a cgroup afterwards."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = int(limit_bytes)
        self.cgroup: Path | None = None
        self.version: int | None = None
        self._make_cgroup()

    @property
    def mechanism(self) -> str:
        if self.cgroup is None:
            return "RLIMIT_DATA"
        return f"cgroup v{self.version} memory limit + RLIMIT_DATA"

    def _make_cgroup(self) -> None:
        own = _own_cgroups()
        name = f"rev-test-{uuid.uuid4().hex[:8]}"
        v1 = CGROUP_ROOT / "memory"
        if "memory" in own and (v1 / "memory.limit_in_bytes").exists():
            parent = v1 / own["memory"].lstrip("/")
            try:
                group = parent / name
                group.mkdir()
            except OSError:
                return
            try:
                (group / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
                if (group / "memory.memsw.limit_in_bytes").exists():
                    (group / "memory.memsw.limit_in_bytes").write_text(str(self.limit_bytes))
            except OSError:
                group.rmdir()
                return
            self.cgroup, self.version = group, 1
            return
        if "" in own and (CGROUP_ROOT / "cgroup.controllers").exists():
            parent = CGROUP_ROOT / own[""].lstrip("/")
            try:
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+memory")
                group = parent / name
                group.mkdir()
            except OSError:
                return  # no delegation (processes in the parent, read-only hierarchy)
            try:
                (group / "memory.max").write_text(str(self.limit_bytes))
                if (group / "memory.swap.max").exists():
                    (group / "memory.swap.max").write_text("0")
            except OSError:
                group.rmdir()
                return
            self.cgroup, self.version = group, 2

    def preexec(self) -> None:
        """In the forked child, before exec: join the cgroup, cap the data segment."""
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_DATA, (self.limit_bytes, self.limit_bytes))

    def oom_kills(self) -> int | None:
        """How many processes the kernel killed for exceeding the cgroup's limit."""
        if self.cgroup is None:
            return None
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.cgroup / events).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None  # an old v1 kernel that does not count them

    def close(self) -> None:
        """Remove the cgroup (its processes must have exited)."""
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
            self.cgroup = None
