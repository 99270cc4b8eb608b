"""Network namespaces: enter one for a call, or start a process inside one (and a cgroup).

`ip netns exec` is not used on purpose: it unshares the mount namespace and remounts /sys,
which hides bpffs and the cgroup hierarchy from the agent it starts. setns(2) on the
network namespace alone keeps every mount visible.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from agent import cgroups

NETNS_RUN_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def setns(name: str) -> None:
    """Move the *calling thread* into network namespace `name`."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn in a fresh thread that lives in netns `name`; the caller's thread is untouched.

    Network namespaces are per thread after setns(2), so a short-lived thread is the cheap
    way to open sockets or write /proc/sys/net in another namespace from this process.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            setns(name)
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def write_sysctl(name: str, key: str, value: str) -> None:
    """Set a net.* sysctl inside netns `name` (key like 'net/ipv4/ip_forward')."""

    def write() -> None:
        Path("/proc/sys", key).write_text(value)

    call_in(name, write)


def _enter(netns: str | None, cgroup: Path | None) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child between fork and exec: join the cgroup first, so every process
        # the command forks is accounted to (and cleaned up with) the pod.
        if cgroup is not None:
            cgroups.move_pid(cgroup, os.getpid())
        if netns is not None:
            setns(netns)

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    netns: str | None,
    cgroup: Path | None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start argv inside a network namespace and a cgroup, like a container's process."""
    # preexec_fn is the only way to join a netns and cgroup between fork and exec; what it
    # runs (a write(2) and a setns(2)) takes no Python-level locks, so it is safe here.
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        preexec_fn=_enter(netns, cgroup),  # noqa: PLW1509
        start_new_session=new_session,
        close_fds=True,
    )
