"""YAML documents that remember where each key came from.

PyYAML's composer keeps marks on every node; we walk the node tree once and record the
line of every mapping key and sequence item so validation errors can point at the line
the user has to edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from controller.model.problems import InvalidConfig, Loc, Problem

# A manifest larger than this is almost certainly not a policy file (and PyYAML is not
# hardened against billion-laughs style alias expansion, so we also refuse aliases).
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


@dataclass
class Document:
    data: Any
    file: str
    index: int  # position in a multi-document stream
    line: int  # first line of the document
    lines: dict[Loc, int] = field(default_factory=dict)


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases are not allowed in weft manifests", event.start_mark
            )
        return super().compose_node(parent, index)


def _index_lines(node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                key = (*loc, k.value)
                _index_lines(v, key, out)
                out[key] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*loc, i), out)


def load_documents(text: str | bytes, file: str) -> list[Document]:
    """Parse every document of a YAML stream; empty documents are skipped."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise InvalidConfig(
            [Problem(f"file is {len(text)} bytes, over the {MAX_DOCUMENT_BYTES} limit", file=file)]
        )
    loader = _NoAliasLoader(text)
    docs: list[Document] = []
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            lines: dict[Loc, int] = {}
            _index_lines(node, (), lines)
            data = loader.construct_document(node)
            if data is not None:
                docs.append(Document(data, file, index, node.start_mark.line + 1, lines))
            index += 1
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        reason = f"YAML syntax: {e.problem or e.context}"
        raise InvalidConfig([Problem(reason, file=file, line=line)]) from None
    except yaml.YAMLError as e:
        raise InvalidConfig([Problem(f"YAML: {e}", file=file)]) from None
    finally:
        loader.dispose()
    return docs
