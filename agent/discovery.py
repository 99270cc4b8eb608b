"""Finding a workload's cgroup, where its eBPF programs attach.

- lab: the lab writes each Workload's cgroup path (relative to the cgroup v2 root).
- kubelet: the kubelet names a pod's cgroup after its UID, in one of two shapes:
    cgroupfs driver  kubepods/<qos>/pod<uid>/
    systemd driver   kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/
                     (uid_: the UID with '-' turned into '_')
  (Guaranteed pods sit directly under kubepods). We search only the kubepods subtree, a
  few levels deep, and cache hits; a miss is retried at the next reconcile because the
  container runtime creates the cgroup after the API server has the pod.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent import cgroups
from controller.model.workloads import Workload

KUBEPODS = ("kubepods", "kubepods.slice")


def pod_cgroup_names(uid: str) -> tuple[str, ...]:
    """Directory names the kubelet may give the cgroup of pod `uid`."""
    under = uid.replace("-", "_")
    systemd = (f"kubepods-{q}pod{under}.slice" for q in ("", "besteffort-", "burstable-"))
    return (f"pod{uid}", *systemd)


def find_kubelet_cgroup(root: Path, uid: str, max_depth: int = 3) -> Path | None:
    names = set(pod_cgroup_names(uid))
    for top in KUBEPODS:
        base = root / top
        if not base.is_dir():
            continue
        stack = [(base, 0)]
        while stack:
            d, depth = stack.pop()
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    continue
                if e.name in names:
                    return Path(e.path)
                if depth < max_depth and (
                    e.name.startswith("kubepods") or e.name in ("besteffort", "burstable")
                ):
                    stack.append((Path(e.path), depth + 1))
    return None


class CgroupResolver:
    def __init__(self, mode: str, root: Path | None = None) -> None:
        self.mode = mode
        self._root = root
        self._cache: dict[str, Path] = {}

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = cgroups.cgroup2_root()
        return self._root

    def cgroup_of(self, w: Workload) -> Path | None:
        if self.mode == "lab":
            if not w.spec.cgroup:
                return None
            p = self.root / w.spec.cgroup.lstrip("/")
            return p if p.is_dir() else None
        uid = w.spec.pod_uid or w.metadata.uid
        if not uid:
            return None
        hit = self._cache.get(uid)
        if hit is not None and hit.is_dir():
            return hit
        found = find_kubelet_cgroup(self.root, uid)
        if found is not None:
            self._cache[uid] = found
        return found
