"""Compile the protobuf API while building (wheel, sdist or editable install).

Everything else about the package lives in pyproject.toml.
"""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        here = Path(__file__).resolve().parent
        runpy.run_path(str(here / "controller" / "api" / "build.py"))["build"](here)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
