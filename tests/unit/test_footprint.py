"""What a waypoint process loads. Its memory target (issue 13: at most 60 MB RSS) is met by
not importing what it never uses; these checks keep a new top-level import from quietly
bringing the weight back. Memory itself is measured by `make bench`, not asserted here."""

from __future__ import annotations

import subprocess
import sys

# Each costs a waypoint several MB (measured on import, CPython 3.11): cryptography about
# 10 (its own OpenSSL), pyroute2 about 20, grpc about 12, protobuf about 3.
NOT_IN_A_WAYPOINT = ("cryptography", "grpc", "google.protobuf", "pyroute2")


def test_weft_waypoint_run_loads_no_x509_grpc_protobuf_or_netlink_library():
    """`weft waypoint run` imports the whole CLI and the waypoint server; neither may pull in
    the libraries only the agent, the controller or `weft lab` need."""
    code = (
        "import sys, agent.cli, agent.waypoint.server\n"
        f"print(','.join(m for m in {NOT_IN_A_WAYPOINT!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", f"a waypoint imports {out.stdout.strip()}"
