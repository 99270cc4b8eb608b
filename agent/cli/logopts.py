"""Logging options shared by `weft agent run` and `weft waypoint run` (one definition)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer


def _log_level(value: str) -> str:
    # Checked here: the run commands exec the agent's own process, which could only fail
    # on it later, with a traceback instead of a usage error.
    if not isinstance(logging.getLevelName(value.upper()), int):
        raise typer.BadParameter(f"unknown log level {value!r}")
    return value


LogLevelOption = Annotated[
    str, typer.Option("--log-level", envvar="WEFT_LOG_LEVEL", callback=_log_level)
]
SampleOption = Annotated[
    float,
    typer.Option(
        "--access-log-sample",
        envvar="WEFT_ACCESS_LOG_SAMPLE",
        min=0.0,
        max=1.0,
        help="Share of ordinary access log lines written (errors, denials and revoked "
        "connections are always written).",
    ),
]
MaxRateOption = Annotated[
    int,
    typer.Option(
        "--access-log-max-rate",
        envvar="WEFT_ACCESS_LOG_MAX_RATE",
        min=0,
        help="At most this many access log lines a second (0: no cap); what a cap leaves "
        "out is counted in a 'suppressed' line.",
    ),
]
MaxMbOption = Annotated[
    float,
    typer.Option(
        "--access-log-max-mb",
        envvar="WEFT_ACCESS_LOG_MAX_MB",
        min=0,
        help="Rotate a file access log to PATH.1 past this size (0: never).",
    ),
]
