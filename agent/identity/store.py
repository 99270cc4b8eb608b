"""The identities a node agent holds, kept where its successor finds them and a reboot
does not: a memory-backed directory (tmpfs or ramfs), root-only.

Why a store and not a hand-over over a socket: it also covers the agent that crashed and
the agent restarted while the controller is down, which a hand-over from a live
predecessor cannot. Why memory-backed: private keys must not reach a disk; the store
survives the agent process, never the node's power. Anything that can read it (node root)
can read the agent's memory as well. A directory that is not memory-backed is refused
(the agent then runs without a store and a restart waits for the controller).

One JSON file per identity, written whole (temporary file, then rename), mode 0600 in a
0700 directory. Expired entries are ignored on load and removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("weft.identity")

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
NODE = "node.json"


def filesystem_of(path: Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the filesystem `path` lives on (the longest mount point above it)."""
    best, kind = "", None
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


class IdentityStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @classmethod
    def open(cls, directory: Path | None) -> IdentityStore | None:
        """The store in `directory`, or None (with the reason logged) when there is none or
        it is not memory-backed."""
        if directory is None:
            return None
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The resolved path is checked and the resolved path is used: a link on the way,
        # pointed elsewhere later, cannot move the store.
        directory = directory.resolve()
        unsafe = unsafe_component(directory)
        if unsafe is not None:
            log.warning(
                "identity store %s refused: %s; keys are not kept (a restarted agent waits "
                "for the controller)",
                directory,
                unsafe,
            )
            return None
        os.chmod(directory, 0o700)
        fs = filesystem_of(directory)
        if fs not in MEMORY_FILESYSTEMS:
            log.warning(
                "identity store %s is on %s, not a memory-backed filesystem: keys are not "
                "kept there (use a tmpfs such as /run or /dev/shm); a restarted agent "
                "waits for the controller",
                directory,
                fs or "an unknown filesystem",
            )
            return None
        return cls(directory)

    def save(self, name: str, record: dict[str, Any]) -> None:
        path = self.dir / name
        tmp = self.dir / f".{name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # O_EXCL | O_NOFOLLOW: never write a key into a file or a link someone else made.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        tmp.replace(path)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / name).unlink()

    def load(self, name: str) -> dict[str, Any] | None:
        """A record that has not expired (`notAfter`, Unix seconds), else None."""
        path = self.dir / name
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("identity store: %s unreadable (%s); ignored", path, e)
            return None
        try:
            expired = float(record.get("notAfter", 0)) <= time.time()
        except (AttributeError, TypeError, ValueError):
            expired = True  # not a record this code wrote: dropped, never trusted
        if expired:
            self.remove(name)
            return None
        return dict(record)

    def names(self, prefix: str) -> list[str]:
        return sorted(p.name for p in self.dir.glob(f"{prefix}*.json"))


def unsafe_component(directory: Path) -> str | None:
    """Why `directory` cannot hold keys, or None: every directory from the root down must
    be a real directory (not a link) owned by root or by us and not writable by group or
    others, except sticky ones such as /tmp and /dev/shm, where nobody can replace
    another's entry. Otherwise another user could swap the store for one they read."""
    me = os.geteuid()
    path = Path("/")
    for part in directory.resolve().parts[1:]:
        path = path / part
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        if st.st_uid not in (0, me):
            return f"{path} belongs to uid {st.st_uid}"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not st.st_mode & stat.S_ISVTX:
            return f"{path} is writable by other users"
        if writable and path == directory.resolve():
            return f"{path} is writable by other users"
    return None


def workload_entry(namespace: str, service_account: str) -> str:
    # "_" appears in neither a namespace nor a service account name: no two identities
    # share an entry.
    return f"workload_{namespace}_{service_account}.json"
