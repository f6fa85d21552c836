"""A memory limit per enclave worker, from the kernel's memory controller (cgroups).

Why: a worker decodes untrusted images. The pixel cap bounds one image, but an image under it
(an 8000x8000 RGBA PNG is 64 M pixels, over a gigabyte through decode and colour conversion)
or several at once can still take the machine's memory, and then the kernel's OOM killer
picks a victim anywhere on the host. With a limit per worker the OOM killer acts inside that
worker's cgroup only: the worker dies, the pool restarts it, the others keep serving, and the
host can tell that memory was the cause (the cgroup's ``oom_kill`` counter) and so does not
retry that request on another worker.

Why not ``RLIMIT_AS``: onnxruntime reserves large virtual arenas up front and numpy/Pillow map
memory freely; an address-space limit breaks them long before resident memory matters.

What is used, in order:

1. cgroup v2 (a ``cgroup2`` mount whose ``cgroup.controllers`` lists ``memory``): a child of
   this process's cgroup per worker, ``memory.max`` and ``memory.swap.max``, the pid written
   to ``cgroup.procs``; OOM kills are counted in ``memory.events``.
   NOT EXERCISED here (this machine runs cgroup v1): v2 forbids processes in a cgroup whose
   subtree has controllers enabled, so when this process's own cgroup holds processes the
   ``+memory`` write fails and no limit is applied (and logged).
2. cgroup v1 with the memory controller mounted and writable: the same with
   ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` when swap is accounted,
   so that swap does not evade the limit); OOM kills in ``memory.oom_control``.
3. Neither: one log line says that no memory limit is applied.

The worker is moved into its cgroup right after it is spawned, while it is still importing
(long before it reads a request), so every allocation that serves a request is counted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["MemoryLimit", "parse_size"]

logger = logging.getLogger("infenclave.host.cgroup")

_MOUNTS = Path("/proc/self/mounts")
_OWN_CGROUP = Path("/proc/self/cgroup")


def parse_size(text: str) -> int:
    """``"1.5G"``, ``"512M"``, ``"65536"`` -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = units.get(value[-1:], 1)
    number = float(value[:-1] if value[-1:] in units else value)
    if not number > 0:
        raise ValueError(f"a memory size must be positive, not {text!r}")
    return int(number * factor)


class MemoryLimit:
    """Per-worker memory cgroups under one parent named after this host process."""

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self.kind: str | None = None  # "v2", "v1" or None (no limit)
        self._parent: Path | None = None
        self._children: dict[str, Path] = {}
        if limit_bytes is None:
            logger.warning("no per-worker memory limit applied (--worker-memory 0)")
            return
        for kind, base in (("v2", _v2_base()), ("v1", _v1_base())):
            if base is None:
                continue
            try:
                self._parent = _make_parent(kind, base)
            except OSError as exc:
                logger.info("cgroup %s at %s not usable (%s)", kind, base, exc)
                continue
            self.kind = kind
            logger.info("per-worker memory limit %d MiB (cgroup %s, %s)", limit_bytes >> 20, kind, self._parent)
            return
        logger.warning(
            "no per-worker memory limit applied: neither a writable cgroup v2 "
            "memory controller nor a writable cgroup v1 memory hierarchy was found"
        )

    def attach(self, name: str, pid: int) -> bool:
        """Put *pid* in a fresh cgroup *name* with the limit; False when no limit applies."""
        if self._parent is None or self.limit_bytes is None:
            return False
        child = self._parent / name
        try:
            child.mkdir(mode=0o755, exist_ok=False)
            limit = str(self.limit_bytes)
            if self.kind == "v2":
                (child / "memory.max").write_text(limit)
                if (child / "memory.swap.max").exists():
                    (child / "memory.swap.max").write_text("0")
            else:
                (child / "memory.limit_in_bytes").write_text(limit)
                if (child / "memory.memsw.limit_in_bytes").exists():
                    (child / "memory.memsw.limit_in_bytes").write_text(limit)
            (child / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            logger.error("worker %s: memory limit not applied (%s)", name, exc)
            _rmdir(child)
            return False
        self._children[name] = child
        return True

    def oom_kills(self, name: str) -> int:
        """How many processes the OOM killer killed inside cgroup *name* (0 if unknown)."""
        child = self._children.get(name)
        if child is None:
            return 0
        path = child / ("memory.events" if self.kind == "v2" else "memory.oom_control")
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def release(self, name: str) -> None:
        """Remove cgroup *name* (its process has exited; if not yet, `close` tries again)."""
        child = self._children.get(name)
        if child is not None and _rmdir(child):
            del self._children[name]

    def close(self) -> None:
        """Remove every cgroup this host made."""
        for name in list(self._children):
            self.release(name)
        if self._parent is not None:
            _rmdir(self._parent)


def _v2_base() -> Path | None:
    for mount in _mounts("cgroup2"):
        try:
            if "memory" in (mount / "cgroup.controllers").read_text().split():
                return mount / _own_path("")
        except OSError:
            continue
    return None


def _v1_base() -> Path | None:
    for mount in _mounts("cgroup", option="memory"):
        own = mount / _own_path("memory")
        # In a container the mount may show the whole hierarchy or only our part of it.
        return own if own.is_dir() else mount
    return None


def _mounts(fstype: str, option: str | None = None) -> list[Path]:
    found = []
    try:
        for line in _MOUNTS.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[2] == fstype and (option is None or option in fields[3].split(",")):
                found.append(Path(fields[1]))
    except OSError:
        pass
    return found


def _own_path(controller: str) -> str:
    """This process's cgroup path for *controller* ("" means the v2 unified line)."""
    try:
        for line in _OWN_CGROUP.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controller == "" and controllers == "") or controller in controllers.split(","):
                return path.lstrip("/")
    except (OSError, ValueError):
        pass
    return ""


def _make_parent(kind: str, base: Path) -> Path:
    _remove_stale(base)
    if kind == "v2":
        (base / "cgroup.subtree_control").write_text("+memory")
    parent = base / f"infenclave-{os.getpid()}"
    parent.mkdir(mode=0o755, exist_ok=True)
    if kind == "v2":
        (parent / "cgroup.subtree_control").write_text("+memory")
    # A probe: the limit file must be writable, not just the directory.
    probe = parent / ("memory.max" if kind == "v2" else "memory.limit_in_bytes")
    if not os.access(probe, os.W_OK):
        _rmdir(parent)
        raise PermissionError(f"{probe} is not writable")
    return parent


def _remove_stale(base: Path) -> None:
    """Remove the (empty) cgroups of earlier hosts that were killed before they could."""
    for parent in base.glob("infenclave-*"):
        pid = parent.name.removeprefix("infenclave-")
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        for child in parent.glob("worker-*"):
            _rmdir(child)
        _rmdir(parent)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
