"""YAML loading that remembers where every value came from.

PyYAML's composer gives a node tree with positions; we build plain Python data from it and,
beside it, a map from each key path (``("agents", 2, "schedule")``) to its 1-based line, so
that validation errors can say ``config.yaml:14: agents[2].schedule: ...``. Duplicate keys,
which PyYAML silently resolves to the last one, are reported as errors here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]

try:  # the C loader is much faster when libyaml is present
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]


@dataclass(slots=True)
class YamlDocument:
    """Parsed data plus the line of every key path in it."""

    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    duplicates: list[tuple[Path_, int]] = field(default_factory=list)

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """Line of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get(())


class YamlSyntaxError(ValueError):
    """The text is not valid YAML; ``line`` is 1-based."""

    def __init__(self, message: str, line: int | None) -> None:
        self.line = line
        super().__init__(message)


def format_path(path: Sequence[str | int]) -> str:
    """Render a key path the way an operator reads it: ``agents[2].guards.timeout``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_yaml(text: str) -> YamlDocument:
    """Parse one YAML document with line tracking.

    Raises ``YamlSyntaxError`` with the line of the problem.
    """
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise YamlSyntaxError(f"invalid YAML: {exc.problem or exc}", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {exc}", None) from None
    doc = YamlDocument(data=None)
    if node is None:
        doc.data = {}
        return doc
    doc.lines[()] = node.start_mark.line + 1
    try:
        doc.data = _build(node, (), doc, frozenset())
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise YamlSyntaxError(
            f"invalid YAML: {exc.problem}", mark.line + 1 if mark else None
        ) from None
    finally:
        # The shared constructor caches every node it built; a daemon that reloads on SIGHUP
        # would otherwise keep every document it ever read.
        _constructor.constructed_objects.clear()
    return doc


_constructor = yaml.SafeLoader("")


def _build(node: yaml.Node, path: Path_, doc: YamlDocument, parents: frozenset[int]) -> Any:
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        # An alias to one of its own ancestors (``x: &a [*a]``) would recurse forever.
        if id(node) in parents:
            raise yaml.constructor.ConstructorError(
                None, None, "recursive aliases are not supported", node.start_mark
            )
        parents = parents | {id(node)}
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys (<<) are not supported", key_node.start_mark
                )
            key = _constructor.construct_object(key_node, deep=True)
            key = str(key) if not isinstance(key, str) else key
            child = (*path, key)
            if key in out:
                doc.duplicates.append((child, key_node.start_mark.line + 1))
            doc.lines[child] = key_node.start_mark.line + 1
            out[key] = _build(value_node, child, doc, parents)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            child = (*path, i)
            doc.lines[child] = item.start_mark.line + 1
            items.append(_build(item, child, doc, parents))
        return items
    return _constructor.construct_object(node, deep=True)
