"""Compile the protobuf API while building (wheel, sdist or editable install).

With WEFT_MYPYC=1, a build also compiles the hot path's modules with mypyc (the list and
why: agent/compiled.py), as an image of weft should:

    WEFT_MYPYC=1 pip install --no-build-isolation .     (mypy installed beside it)

A development checkout gets them in place from `make compiled` instead. Everything else
about the package lives in pyproject.toml.
"""

import os
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        runpy.run_path(str(HERE / "controller" / "api" / "build.py"))["build"](HERE)
        super().run()


def compiled_extensions() -> list:
    if os.environ.get("WEFT_MYPYC") != "1":
        return []
    from mypyc.build import mypycify

    modules = runpy.run_path(str(HERE / "agent" / "compiled.py"))["MODULES"]
    return mypycify([m.replace(".", "/") + ".py" for m in modules])


setup(cmdclass={"build_py": BuildPyWithProtos}, ext_modules=compiled_extensions())
