"""YAML documents that remember where each key came from.

PyYAML's composer keeps marks on every node; we walk the node tree once and record the
line of every mapping key and sequence item so validation errors can point at the line
the user has to edit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from controller.model.problems import InvalidConfig, Loc, Problem

# A manifest larger than this is almost certainly not a policy file (and PyYAML is not
# hardened against billion-laughs style alias expansion, so aliases are refused too).
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


@dataclass
class Document:
    data: Any
    file: str
    index: int  # position in a multi-document stream
    line: int  # first line of the document
    lines: dict[Loc, int] = field(default_factory=dict)


# LibYAML's parser and composer (C) when PyYAML was built with it, as the wheels are:
# 7x faster than the pure-Python loader, which made a 10,000-workload config take 7.5 s
# to load. Its nodes carry the same marks.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _AliasFound(Exception):
    """A node met twice while indexing: an alias (reported where it is used)."""


def _index_lines(node: yaml.Node, loc: Loc, out: dict[Loc, int], seen: set[int]) -> None:
    # An alias composes to the node of its anchor, so a node met twice is one. It is
    # refused before anything is constructed (billion-laughs expansion never happens).
    if id(node) in seen:
        raise _AliasFound
    seen.add(id(node))
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                key = (*loc, k.value)
                if id(k) in seen:
                    raise _AliasFound
                seen.add(id(k))
                _index_lines(v, key, out, seen)
                out[key] = k.start_mark.line + 1
            else:
                _index_lines(k, (*loc, "<key>"), {}, seen)
                _index_lines(v, (*loc, "<value>"), {}, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*loc, i), out, seen)


def _first_alias_line(text: str | bytes) -> int | None:
    """The line of the stream's first alias (the error path only: events carry it)."""
    with contextlib.suppress(yaml.YAMLError):
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent) and event.start_mark is not None:
                return event.start_mark.line + 1
    return None


ALIASES_REFUSED = "YAML syntax: YAML aliases are not allowed in weft manifests"


def load_documents(text: str | bytes, file: str) -> list[Document]:
    """Parse every document of a YAML stream; empty documents are skipped."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise InvalidConfig(
            [Problem(f"file is {len(text)} bytes, over the {MAX_DOCUMENT_BYTES} limit", file=file)]
        )
    loader = _Loader(text)
    docs: list[Document] = []
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            lines: dict[Loc, int] = {}
            _index_lines(node, (), lines, set())
            data = loader.construct_document(node)
            if data is not None:
                docs.append(Document(data, file, index, node.start_mark.line + 1, lines))
            index += 1
    except _AliasFound:
        line = _first_alias_line(text)
        raise InvalidConfig([Problem(ALIASES_REFUSED, file=file, line=line)]) from None
    except RecursionError:
        raise InvalidConfig([Problem("YAML: nested too deeply", file=file)]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = e.problem or e.context or ""
        # LibYAML resolves aliases while composing: one naming no anchor is still an alias.
        reason = ALIASES_REFUSED if "alias" in problem else f"YAML syntax: {problem}"
        raise InvalidConfig([Problem(reason, file=file, line=line)]) from None
    except yaml.YAMLError as e:
        raise InvalidConfig([Problem(f"YAML: {e}", file=file)]) from None
    finally:
        loader.dispose()
    return docs
