"""What the data path needs from the host, checked before touching the kernel.

Each failure is an EnvironmentProblem naming what is missing and the command that fixes
it. The compiler checks (headers, bcc) only run when the bytecode is not cached.
"""

from __future__ import annotations

import importlib.util
import platform
import sysconfig
from pathlib import Path

from controller.errors import EnvironmentProblem

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")


def check(pin_root: Path, *, need_compiler: bool) -> None:
    privileges()
    bpffs(pin_root)
    if need_compiler:
        bcc()
        kernel_headers()


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def privileges() -> None:
    caps = _effective_caps()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_NET_ADMIN)):
        return
    raise EnvironmentProblem(
        "the data path needs CAP_BPF and CAP_NET_ADMIN (or root) to load and attach eBPF",
        hint="run the agent as root (sudo), or grant the capabilities: "
        "setcap cap_bpf,cap_net_admin+ep on its interpreter; in Kubernetes the DaemonSet "
        "runs privileged",
    )


def _bpf_mounts() -> list[Path]:
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "bpf":
                found.append(Path(parts[1]))
    return found


def bpffs(pin_root: Path) -> None:
    mounts = _bpf_mounts()
    if any(pin_root == m or m in pin_root.parents for m in mounts):
        return
    if not mounts:
        raise EnvironmentProblem(
            "bpffs is not mounted, so the data path cannot pin its maps (they would vanish "
            "with the agent process)",
            hint="mount -t bpf bpf /sys/fs/bpf  (or: make setup)",
        )
    raise EnvironmentProblem(
        f"the pin root {pin_root} is not on a bpf filesystem "
        f"(bpffs is mounted at {', '.join(map(str, mounts))})",
        hint=f"choose a pin root under {mounts[0]}, e.g. {mounts[0] / 'weft'}",
    )


def bcc() -> None:
    """bcc's Python module can be found. Not imported here: that would map libbcc and LLVM
    into the agent for good; the compile runs in a child process (compiler.build)."""
    if importlib.util.find_spec("bcc") is None:
        site = sysconfig.get_paths()["purelib"]
        raise EnvironmentProblem(
            "bcc's Python module is not importable (the data path compiles bpf/weft.c with it; "
            "the PyPI package named bcc is unrelated)",
            hint="apt-get install python3-bpfcc libbpfcc, then make Debian's module visible "
            f"to this Python: ln -s {DEBIAN_BCC} {site}/bcc  (or: make setup)",
        )


def kernel_headers() -> None:
    release = platform.release()
    build = Path(f"/lib/modules/{release}/build")
    if (build / "include" / "generated").is_dir():
        return
    amd = sorted(Path("/usr/src").glob("linux-headers-*-amd64"))
    common = sorted(Path("/usr/src").glob("linux-headers-*-common"))
    if amd and common:
        fix = (
            f"mkdir -p /lib/modules/{release} && "
            f"ln -sfn {amd[-1]} {build} && ln -sfn {common[-1]} /lib/modules/{release}/source"
        )
    else:
        fix = (
            "apt-get install linux-headers-amd64, then link them: "
            f"ln -sfn /usr/src/linux-headers-<ver>-amd64 {build} && "
            f"ln -sfn /usr/src/linux-headers-<ver>-common /lib/modules/{release}/source"
        )
    raise EnvironmentProblem(
        f"no kernel headers at {build}: bcc needs them to compile bpf/weft.c",
        hint=f"{fix}  (or: make setup)",
    )
