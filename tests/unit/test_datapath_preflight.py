"""Each missing host prerequisite is reported with the command that fixes it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from agent.datapath import preflight
from controller.errors import EnvironmentProblem


def test_without_privileges_the_fix_is_root_or_capabilities(monkeypatch):
    monkeypatch.setattr(preflight, "_effective_caps", lambda: 0)
    with pytest.raises(EnvironmentProblem) as e:
        preflight.privileges()
    assert "CAP_BPF" in e.value.message and "root" in (e.value.hint or "")


def test_cap_bpf_and_net_admin_are_enough(monkeypatch):
    caps = 1 << preflight.CAP_BPF | 1 << preflight.CAP_NET_ADMIN
    monkeypatch.setattr(preflight, "_effective_caps", lambda: caps)
    preflight.privileges()


def test_without_bpffs_the_fix_is_the_mount_command(monkeypatch):
    monkeypatch.setattr(preflight, "_bpf_mounts", lambda: [])
    with pytest.raises(EnvironmentProblem) as e:
        preflight.bpffs(Path("/sys/fs/bpf/weft/agent"))
    assert e.value.hint is not None and "mount -t bpf bpf /sys/fs/bpf" in e.value.hint


def test_a_pin_root_off_bpffs_names_where_bpffs_is(monkeypatch):
    monkeypatch.setattr(preflight, "_bpf_mounts", lambda: [Path("/sys/fs/bpf")])
    preflight.bpffs(Path("/sys/fs/bpf/weft/lab/node-1"))
    with pytest.raises(EnvironmentProblem) as e:
        preflight.bpffs(Path("/tmp/pins"))
    assert "/sys/fs/bpf/weft" in (e.value.hint or "")


def test_without_headers_the_fix_is_the_exact_links(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight.platform, "release", lambda: "9.9.9-test")
    with pytest.raises(EnvironmentProblem) as e:
        preflight.kernel_headers()
    hint = e.value.hint or ""
    assert "/lib/modules/9.9.9-test/build" in hint and "ln -sfn" in hint
    assert "make setup" in hint


def test_without_bcc_the_fix_is_debians_package_and_the_link(monkeypatch):
    """The check finds bcc without importing it (that would map LLVM into the agent)."""
    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bcc" else real_find(name, *a)
    )
    with pytest.raises(EnvironmentProblem) as e:
        preflight.bcc()
    hint = e.value.hint or ""
    assert "apt-get install python3-bpfcc" in hint and "ln -s" in hint
