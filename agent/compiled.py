"""The modules weft runs compiled: mypyc turns their Python source into C extensions.

These are the synchronous modules every proxied request runs through (the HTTP/1.1
codec, header lists, path normalization, the L7 engine, the tunnel's HTTP/2). The source
stays the truth: mypyc compiles the same code, checked by the same mypy, and where no
extension is built the source runs as it is. Compiled, these modules cost a fraction of
their interpreted time (docs/performance.md, "The interpreter and compiled modules"): the
HTTP/1.1 codec about half per proxied request.

`make setup` builds them (`make compiled`) into the source tree, as an editable install
needs; a wheel built with WEFT_MYPYC=1 has them (setup.py). An extension older than its
source would shadow the edit, so `stale()` names any such module: the test suite refuses
to run with one, and the agent and waypoint log it at start.

    python3 agent/compiled.py            the source files, for the Makefile
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Synchronous modules only: coroutines and classes that interpreted code subclasses (or
# tests replace methods of) stay interpreted.
MODULES: tuple[str, ...] = (
    "agent.waypoint.codec.http1",
    "agent.waypoint.codec.headers",
    "agent.waypoint.pathnorm",
    "agent.waypoint.engine.backend",
    "agent.waypoint.engine.balancer",
    "agent.waypoint.engine.engine",
    "agent.waypoint.engine.fault",
    "agent.waypoint.engine.health",
    "agent.waypoint.engine.outcome",
    "agent.waypoint.engine.outlier",
    "agent.waypoint.engine.pool",
    "agent.waypoint.engine.respond",
    "agent.waypoint.engine.retry",
    "agent.waypoint.engine.routes",
    "agent.tunnel.h2",
)


def source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def extensions(module: str) -> list[Path]:
    """The extension files built for `module` that an import would find beside its source."""
    src = source(module)
    return [
        p
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if (p := src.with_name(src.stem + suffix)).exists()
    ]


def is_compiled(module: str) -> bool:
    """Whether `module`, once imported, runs compiled (already imported: what it is)."""
    mod = sys.modules.get(module)
    if mod is not None:
        return not str(getattr(mod, "__file__", "")).endswith(".py")
    return bool(extensions(module))


def stale() -> list[str]:
    """Modules whose extension is older than their source: an import would run old code."""
    out = []
    for m in MODULES:
        src = source(m)
        built = extensions(m)
        if built and src.exists() and min(p.stat().st_mtime for p in built) < src.stat().st_mtime:
            out.append(m)
    return out


def describe(old: list[str] | None = None) -> str:
    """One line for a process's start: the interpreter and what runs compiled. `old`:
    stale()'s answer, when the caller has it already."""
    n = sum(is_compiled(m) for m in MODULES)
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))  # not the venv's
    line = f"CPython {sys.version.split()[0]} ({base}); {n}/{len(MODULES)} modules compiled"
    if old is None:
        old = stale()
    if old:
        line += f"; OLDER THAN THEIR SOURCE, run `make compiled`: {', '.join(old)}"
    return line


if __name__ == "__main__":
    print(" ".join(str(source(m).relative_to(ROOT)) for m in MODULES))
