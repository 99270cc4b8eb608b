"""Node-local pod discovery: the kubelet's cgroup of a pod, found from the Workload the
Kubernetes source derives from a recorded pod (its UID and QoS class), in the layouts the
kubelet makes with the cgroupfs and the systemd cgroup drivers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.discovery import CgroupResolver, find_kubelet_cgroup, pod_cgroup_names
from controller.model.workloads import Workload
from controller.sources import kubernetes as k8s

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "k8s"


def recorded(name: str) -> dict[str, Any]:
    return dict(json.loads((DATA / name).read_text()))


def kubelet_dir(root: Path, driver: str, qos: str, uid: str) -> Path:
    """Where the kubelet puts a pod's cgroup (pkg/kubelet/cm: cgroup_manager_linux.go)."""
    if driver == "cgroupfs":
        parts = ["kubepods"] + ([] if qos == "Guaranteed" else [qos.lower()]) + [f"pod{uid}"]
    else:
        u = uid.replace("-", "_")
        if qos == "Guaranteed":
            parts = ["kubepods.slice", f"kubepods-pod{u}.slice"]
        else:
            q = qos.lower()
            parts = ["kubepods.slice", f"kubepods-{q}.slice", f"kubepods-{q}-pod{u}.slice"]
    d = root.joinpath(*parts)
    d.mkdir(parents=True)
    (d / "cri-containerd-0123.scope").mkdir()  # a container below the pod: not the match
    return d


def workload(pod: dict[str, Any]) -> Workload:
    w = k8s.convert(k8s.PODS, pod, {k8s.MESH_LABEL: k8s.MESH_ENABLED})
    assert isinstance(w, Workload)
    return w


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
@pytest.mark.parametrize("qos", ["Burstable", "BestEffort", "Guaranteed"])
def test_a_recorded_pods_cgroup_is_found(tmp_path: Path, driver: str, qos: str) -> None:
    pod = recorded("pod-kind-sidecar.json")
    pod["status"]["qosClass"] = qos
    w = workload(pod)
    assert w.spec.pod_uid == pod["metadata"]["uid"]
    want = kubelet_dir(tmp_path, driver, qos, pod["metadata"]["uid"])
    # Other pods on the node, in every QoS class, must not confuse the search.
    kubelet_dir(tmp_path, driver, "BestEffort" if qos != "BestEffort" else "Burstable", "0000")
    assert CgroupResolver("kubelet", tmp_path).cgroup_of(w) == want


def test_systemd_names_turn_dashes_into_underscores() -> None:
    uid = "35079257-0ffb-4b09-b2c1-3c0d416f2523"
    names = pod_cgroup_names(uid)
    assert f"pod{uid}" in names
    assert "kubepods-burstable-pod35079257_0ffb_4b09_b2c1_3c0d416f2523.slice" in names


def test_a_pod_whose_cgroup_is_not_there_yet_is_retried(tmp_path: Path) -> None:
    (pod,) = recorded("podlist-kind-managedfields.json")["items"]
    w = workload(pod)
    resolver = CgroupResolver("kubelet", tmp_path)
    assert resolver.cgroup_of(w) is None  # the runtime makes it after the API has the pod
    want = kubelet_dir(tmp_path, "systemd", "BestEffort", pod["metadata"]["uid"])
    assert resolver.cgroup_of(w) == want
    # Cached, and the cache does not outlive the directory.
    for d in sorted(want.rglob("*"), reverse=True):
        d.rmdir()
    want.rmdir()
    assert resolver.cgroup_of(w) is None


def test_a_workload_without_a_pod_uid_has_no_kubelet_cgroup(tmp_path: Path) -> None:
    w = workload(recorded("pod-kind-sidecar.json"))
    spec = w.spec.model_copy(update={"pod_uid": None})
    assert (
        CgroupResolver("kubelet", tmp_path).cgroup_of(w.model_copy(update={"spec": spec})) is None
    )


def test_search_stays_in_the_kubepods_subtree(tmp_path: Path) -> None:
    uid = "35079257-0ffb-4b09-b2c1-3c0d416f2523"
    (tmp_path / "system.slice" / f"pod{uid}").mkdir(parents=True)
    assert find_kubelet_cgroup(tmp_path, uid) is None


def test_lab_mode_reads_the_path_the_lab_wrote(tmp_path: Path) -> None:
    w = workload(recorded("pod-kind-sidecar.json"))
    (tmp_path / "weft" / "lab" / "pods" / "sleep").mkdir(parents=True)
    lab = w.model_copy(update={"spec": w.spec.model_copy(update={"cgroup": "weft/lab/pods/sleep"})})
    resolver = CgroupResolver("lab", tmp_path)
    assert resolver.cgroup_of(lab) == tmp_path / "weft" / "lab" / "pods" / "sleep"
    assert resolver.cgroup_of(w) is None  # no path written: not a lab workload
