"""Bounded YAML parsing for text that comes from anyone with a token.

At most 32 levels of nesting, at most 10,000 nodes once aliases are expanded (a
billion-laughs document is refused after measuring, before any Python object is
built), no recursive aliases, no duplicate keys (PyYAML would silently keep the
last one) and only YAML's core types (str, int, float, bool, null, mappings, lists
and `<<` merge keys). Every refusal is a JobSpecError naming the field.
"""

from __future__ import annotations

from typing import Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from domain.errors import FieldError, JobSpecError

__all__ = ["MAX_YAML_DEPTH", "MAX_YAML_NODES", "load_yaml"]

MAX_YAML_NODES: Final = 10_000
MAX_YAML_DEPTH: Final = 32

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS: Final = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null"))
_MERGE_TAG: Final = _TAG + "merge"
# Longer numbers only serve to make PyYAML burn time (sexagesimal ints) or raise (4300+ digits).
_MAX_NUMBER_CHARS: Final = 64


class _Refused(Exception):
    """The YAML breaks one of the size limits; carries the reason and where."""

    def __init__(self, reason: str, mark: yaml.Mark | None) -> None:
        super().__init__(reason + _where(mark))


def _where(mark: yaml.Mark | None) -> str:
    return "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that stops composing once the text nests too deep or has too many nodes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        # PyYAML composes recursively; bounding the depth here keeps Python's stack safe.
        mark: yaml.Mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        # Aliases count too: each expands to at least one node, and a text of nothing but
        # aliases must not be composed in full before the walk refuses it.
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _Refused(f"has more than {MAX_YAML_NODES} YAML nodes", mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"is nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _GraphCheck:
    """Measures a composed node graph as if every alias were expanded, before constructing it.

    Aliases share nodes, so memoizing each node's expanded size and height makes this linear in
    the text, while a billion-laughs document is refused after at most MAX_YAML_NODES steps.
    """

    def __init__(self, loader: _BoundedLoader) -> None:
        self.loader = loader
        self.measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
        self.open: set[int] = set()  # nodes on the current path: meeting one again is recursion
        self.errors: list[FieldError] = []

    def walk(self, node: Node, path: str, depth: int) -> tuple[int, int]:
        if depth > MAX_YAML_DEPTH:
            raise _Refused(
                f"is nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded",
                node.start_mark,
            )
        key = id(node)
        if key in self.open:
            raise _Refused("has a recursive alias (a node that contains itself)", node.start_mark)
        if key not in self.measured:
            self.open.add(key)
            self.measured[key] = self._measure(node, path, depth)
            self.open.discard(key)
        size, height = self.measured[key]
        if depth - 1 + height > MAX_YAML_DEPTH:
            raise _Refused(
                f"is nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded",
                node.start_mark,
            )
        return size, height

    def _measure(self, node: Node, path: str, depth: int) -> tuple[int, int]:
        if isinstance(node, ScalarNode):
            self._check_scalar(node, path)
            return 1, 1
        size, height = 1, 1
        children: list[tuple[Node, str]] = []
        if isinstance(node, SequenceNode):
            self._check_tag(node, _TAG + "seq", path)
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, MappingNode):
            self._check_tag(node, _TAG + "map", path)
            children = self._mapping_children(node, path)
            size += len(node.value)  # the keys
        for child, child_path in children:
            child_size, child_height = self.walk(child, child_path, depth + 1)
            size += child_size
            height = max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise _Refused(
                    f"expands to more than {MAX_YAML_NODES} YAML nodes (each use of an alias "
                    "counts in full)",
                    node.start_mark,
                )
        return size, height

    def _mapping_children(self, node: MappingNode, path: str) -> list[tuple[Node, str]]:
        """The values to walk; keys are plain scalars, checked here and counted by the caller."""
        children: list[tuple[Node, str]] = []
        seen: dict[object, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                # Merged entries land in this mapping, so they share its path.
                children.append((value_node, path))
                continue
            if not isinstance(key_node, ScalarNode):
                self._error(path, "has a list or mapping as a key; keys must be plain names")
                continue
            key = self._scalar_value(key_node, path)
            child_path = f"{path}.{key}"
            if key in seen:
                first = seen[key]
                self._error(
                    child_path,
                    f"duplicate key {key!r} (lines {first.line + 1} and "
                    f"{key_node.start_mark.line + 1}); YAML would silently keep only the last one",
                )
            else:
                seen[key] = key_node.start_mark
            children.append((value_node, child_path))
        return children

    def _scalar_value(self, node: ScalarNode, path: str) -> object:
        """The key's Python value, so `1` and `01` or `yes` and `true` count as the same key."""
        if node.tag == _TAG + "str" or not self._check_scalar(node, path):
            return node.value
        return self.loader.construct_object(node)

    def _check_scalar(self, node: ScalarNode, path: str) -> bool:
        tag = node.tag
        if tag not in _SCALAR_TAGS:
            self._error(
                path,
                f"uses the YAML type {_short_tag(tag)}, which a trainer configuration has no use "
                f"for; quote the value to make it a string{_where(node.start_mark)}",
            )
            return False
        if tag == _TAG + "str":
            return True
        # An explicit tag must agree with what the text means on its own (`!!int abc` is garbage).
        plain = self.loader.resolve(ScalarNode, node.value, (True, False))  # type: ignore[no-untyped-call]
        agrees = plain == tag or (tag == _TAG + "float" and plain == _TAG + "int")
        if not agrees:
            self._error(path, f"{node.value!r} is not a valid {_short_tag(tag)}")
            return False
        if tag in (_TAG + "int", _TAG + "float") and len(node.value) > _MAX_NUMBER_CHARS:
            self._error(path, f"is a number written with more than {_MAX_NUMBER_CHARS} characters")
            return False
        try:
            # Built now (and kept for later): PyYAML's int() refuses a few forms its resolver
            # accepts, such as 0b_.
            self.loader.construct_object(node)
        except ValueError:
            self._error(path, f"{node.value!r} is not a valid number")
            return False
        return True

    def _check_tag(self, node: Node, expected: str, path: str) -> None:
        if node.tag != expected:
            self._error(path, f"uses the YAML type {_short_tag(node.tag)}, which is not supported")

    def _error(self, path: str, reason: str) -> None:
        self.errors.append(FieldError(path, reason))


def load_yaml(text: str) -> object:
    """Parse YAML text into plain Python values, refusing bombs, duplicates and odd types."""
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        check = _GraphCheck(loader)
        check.walk(node, "config", 1)
        if check.errors:
            raise JobSpecError(check.errors)
        return loader.construct_document(node)
    except _Refused as e:
        raise JobSpecError.single("config", str(e)) from None
    except yaml.MarkedYAMLError as e:
        what = ", ".join(m for m in (e.context, e.problem) if m) or "malformed"
        mark = e.problem_mark or e.context_mark
        raise JobSpecError.single("config", f"is not valid YAML: {what}{_where(mark)}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise JobSpecError.single(
            "config",
            f"is not valid YAML: character U+{e.character:04X} on line {line} is not allowed",
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
