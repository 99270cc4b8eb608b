"""One way to print results everywhere in the CLI: -o table|json|yaml."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import typer
import yaml


class Format(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOption = typer.Option(Format.table, "--output", "-o", help="Output format.")


def emit(
    data: Any,
    fmt: Format,
    *,
    columns: Sequence[tuple[str, str]] | None = None,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Print `data` as JSON/YAML, or `rows` (default: data) as a table of `columns`.

    columns are (header, key) pairs; a key may be dotted ("status.phase").
    """
    if fmt is Format.json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    elif fmt is Format.yaml:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        table_rows = rows if rows is not None else data
        sys.stdout.write(table(table_rows, columns or _guess(table_rows)))


def _guess(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    return [(k.upper(), k) for k in keys]


def _get(row: Mapping[str, Any], key: str) -> Any:
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part, "")
    return cur


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, Mapping):
        return ",".join(f"{k}={val}" for k, val in v.items())
    if isinstance(v, list | tuple):
        return ",".join(_cell(x) for x in v)
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    cells = [[_cell(_get(r, key)) for _, key in columns] for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, (h, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines) + "\n"
