"""cgroup v2: find the unified hierarchy, make and remove weft's cgroups, move processes.

The development machines mount cgroup v2 as the "unified" half of a hybrid hierarchy
(/sys/fs/cgroup/unified); Kubernetes nodes usually mount it at /sys/fs/cgroup. We read
/proc/self/mounts instead of guessing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from controller.errors import EnvironmentProblem

WEFT_PARENT = "weft"  # weft-owned subtree for lab nodes, pods and processes


def cgroup2_root() -> Path:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    return Path(parts[1])
    except OSError:
        pass
    raise EnvironmentProblem(
        "no cgroup v2 hierarchy is mounted",
        hint="mount one: mkdir -p /sys/fs/cgroup/unified && "
        "mount -t cgroup2 none /sys/fs/cgroup/unified (weft needs cgroup v2 for its eBPF hooks)",
    )


def own_cgroup() -> Path | None:
    """This process's cgroup v2 directory (from /proc/self/cgroup), or None when it runs in
    the hierarchy's root (attaching there would cover every process of the host)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hier, _, rel = line.split(":", 2)
            if hier == "0":
                if rel in ("", "/"):
                    return None
                path = cgroup2_root() / rel.lstrip("/")
                return path if path.is_dir() else None
    except (OSError, ValueError, EnvironmentProblem):
        return None
    return None


def cgroup_id(path: Path) -> int:
    """The kernel's cgroup id is the inode number of the cgroup directory (cgroup v2)."""
    return os.stat(path).st_ino


def make(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def move_pid(path: Path, pid: int) -> None:
    (path / "cgroup.procs").write_text(f"{pid}\n")


def pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _populated(path: Path) -> bool:
    try:
        for line in (path / "cgroup.events").read_text().splitlines():
            if line.startswith("populated "):
                return line.split()[1] == "1"
    except FileNotFoundError:
        return False
    return bool(pids(path))


def kill_all(path: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process in the subtree and wait until it is empty.

    cgroup.kill (Linux 5.14) kills the whole subtree atomically, so nothing forks away
    mid-sweep; on older kernels we fall back to signalling each cgroup's members.
    """
    if not path.exists():
        return
    killer = path / "cgroup.kill"
    if killer.exists():
        with contextlib.suppress(OSError):
            killer.write_text("1")
    deadline = time.monotonic() + timeout
    while _populated(path):
        for d in [path, *path.rglob("*")]:
            if d.is_dir():
                for pid in pids(d):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise EnvironmentProblem(f"processes in {path} did not exit after SIGKILL")
        time.sleep(0.02)


def remove_tree(path: Path) -> None:
    """Kill the processes in `path` and remove it and every cgroup below it."""
    if not path.exists():
        return
    kill_all(path)
    dirs = sorted(
        (d for d in path.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True
    )
    for d in [*dirs, path]:
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY: the last member is still being reaped; the kernel frees it shortly.
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)
