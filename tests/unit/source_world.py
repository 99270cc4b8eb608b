"""The compiled modules (agent/compiled.py) loaded again from their Python source, *together*:
a source module imports the source versions of the other listed modules, so an interpreted
engine runs interpreted routes, backend and headers.

    src = source_world()
    src["agent.waypoint.engine.engine"].Engine(...)

The compiled modules in sys.modules (and their packages' attributes) are put back afterwards.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

from agent import compiled

_WORLD: dict[str, ModuleType] = {}  # filled once


class _SourceFinder:
    """Finds the listed modules as their .py source (never the extension beside it)."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None):
        if name in compiled.MODULES:
            return importlib.util.spec_from_file_location(name, compiled.source(name))
        return None


def source_world() -> dict[str, ModuleType]:
    if _WORLD:
        return _WORLD
    for m in compiled.MODULES:  # the compiled ones first, so they are what is put back
        importlib.import_module(m)
    saved = {m: sys.modules[m] for m in compiled.MODULES}
    parents = {m: getattr(sys.modules[m.rpartition(".")[0]], m.rpartition(".")[2]) for m in saved}
    finder = _SourceFinder()
    sys.meta_path.insert(0, finder)
    out: dict[str, ModuleType] = {}
    try:
        for m in compiled.MODULES:
            del sys.modules[m]
        for m in compiled.MODULES:
            out[m] = importlib.import_module(m)
            assert out[m].__file__.endswith(".py"), out[m].__file__
    finally:
        sys.meta_path.remove(finder)
        for m, mod in saved.items():
            sys.modules[m] = mod
            setattr(sys.modules[m.rpartition(".")[0]], m.rpartition(".")[2], parents[m])
    _WORLD.update(out)
    return _WORLD


def native(module: str) -> ModuleType:
    mod = importlib.import_module(module)
    return mod
