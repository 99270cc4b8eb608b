"""`weft policy validate/apply` input checks that run before anything is sent: a file too
large for a policy file, or an apply too large as a whole, is named with the limit
(instead of a gRPC message-size error), and the same resource twice is named twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ai}
spec: {}
"""


def weft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_oversized_file_is_named_with_the_limit(tmp_path: Path) -> None:
    """A 10 MB file is refused by name and size, with the per-file limit; nothing of it
    is parsed or sent."""
    big = tmp_path / "dump.yaml"
    big.write_bytes(b"# " + b"x" * (10 * 1024 * 1024) + b"\n" + POLICY.encode())
    r = weft("policy", "validate", "-f", str(big))
    assert r.returncode == 2, r
    assert str(big) in r.stderr and "10.0 MiB" in r.stderr and "4 MiB limit" in r.stderr


def test_stdin_is_bounded_too() -> None:
    """Standard input larger than a policy file may be is refused the same way."""
    r = weft("policy", "validate", "-f", "-", stdin="#" * (5 * 1024 * 1024))
    assert r.returncode == 2 and "<stdin>" in r.stderr and "4 MiB limit" in r.stderr


def test_many_files_over_the_apply_limit_are_refused_together(tmp_path: Path) -> None:
    """Each file within its limit, but more than one apply may carry in all."""
    for i in range(5):
        (tmp_path / f"p{i}.yaml").write_text("# " + "y" * (3900 * 1024) + "\n" + POLICY)
    r = weft("policy", "validate", "-f", str(tmp_path))
    assert r.returncode == 2 and "16 MiB limit for one apply" in r.stderr


def test_the_same_resource_in_two_files_is_named_in_both(tmp_path: Path) -> None:
    """Offline validation refuses what the controller would: a duplicate, naming both."""
    (tmp_path / "a.yaml").write_text(POLICY)
    (tmp_path / "b.yaml").write_text(POLICY.replace("spec: {}", "spec: {action: DENY}"))
    r = weft("policy", "validate", "-f", str(tmp_path))
    assert r.returncode == 2
    assert "defined 2 times" in r.stderr
    assert "a.yaml:1" in r.stderr and "b.yaml:1" in r.stderr
