"""Validation problems that point at the exact place in the user's file.

Every source of configuration (lab manifests, policy YAML, the Kubernetes API) reports
failures as a list of `Problem`s, so the CLI, the controller's logs and NACKs all read the
same way: ``policy/route.yaml:14: HTTPRoute inference/llm: spec.rules[0].backendRefs[1].weight:
must be >= 0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from controller.errors import WeftError

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    reason: str
    file: str | None = None
    line: int | None = None
    resource: str | None = None  # "Kind namespace/name" or "Kind name"
    field: str | None = None  # "spec.pods[3].node"

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(f"{self.file}:{self.line}" if self.line else self.file)
        if self.resource:
            where.append(self.resource)
        if self.field:
            where.append(self.field)
        return ": ".join([*where, self.reason])

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class InvalidConfig(WeftError):
    """One or more resources failed validation; nothing from the failing input was applied."""

    exit_code = 2

    def __init__(self, problems: Sequence[Problem], *, hint: str | None = None) -> None:
        self.problems = list(problems)
        lines = [str(p) for p in self.problems]
        head = "invalid configuration" if len(lines) != 1 else lines[0]
        body = "" if len(lines) == 1 else "\n" + "\n".join(f"  - {line}" for line in lines)
        super().__init__(head + body, hint=hint)


def format_loc(loc: Iterable[str | int]) -> str:
    """('spec', 'pods', 3, 'node') -> 'spec.pods[3].node'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def problems_from_validation(
    err: ValidationError,
    *,
    file: str | None = None,
    resource: str | None = None,
    prefix: Loc = (),
    lines: dict[Loc, int] | None = None,
) -> list[Problem]:
    """Turn pydantic's errors into Problems with a field path and, when known, a line."""
    out = []
    for e in err.errors(include_url=False):
        # pydantic puts the failing tagged-union member or validator name in loc; drop the
        # parts that are not keys of the user's document so the path matches their file.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        full = prefix + loc
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see docs/policy-reference.md)"
        out.append(
            Problem(
                reason=msg,
                file=file,
                line=line_of(lines, full) if lines else None,
                resource=resource,
                field=format_loc(full) or None,
            )
        )
    return out


def line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The line of the deepest part of `loc` that exists in the document."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None
