"""The job spec: everything needed to run a training job, and to run it again, validated on submit.

A spec arrives as a JSON body (or a stored dict) and holds the ML-Agents trainer configuration as
YAML text. That text comes from anyone with a token, so it is parsed defensively: at most 256 KiB,
at most 32 levels of nesting, at most 10,000 nodes once aliases are expanded (a billion-laughs
document is refused after measuring, before any Python object is built), no recursive aliases, no
duplicate keys (PyYAML would silently keep the last one) and only YAML's core types (str, int,
float, bool, null, mappings, lists and `<<` merge keys): timestamps, binary, sets and other tags
are refused. The schema of the parsed mapping, and where it is stricter than ML-Agents, is in
domain.trainer_config.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from domain.errors import FieldError, JobSpecError
from domain.trainer_config import validate_trainer_config

__all__ = ["EnvRef", "JobSpec", "parse_job_spec", "parse_trainer_config"]

MAX_CONFIG_BYTES: Final = 256 * 1024
MAX_YAML_NODES: Final = 10_000
MAX_YAML_DEPTH: Final = 32

# Inclusive bounds of the spec's integer fields.
_LIMITS: Final = {
    "seed": (0, 2**31 - 1),  # ML-Agents and Unity take a 32-bit signed seed
    "max_steps": (1, 10**9),  # a billion steps is weeks of training for any environment
    "num_envs": (1, 16),  # Unity processes per job; more would starve a train node
    "time_limit_s": (1, 7 * 24 * 3600),  # a week
}
_DEFAULTS: Final[dict[str, int | None]] = {
    "seed": 0,
    "max_steps": None,
    "num_envs": 1,
    "time_limit_s": 3600,
}
_SPEC_FIELDS: Final = ("config", "env", *_DEFAULTS)
_BUILTIN_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EnvRef:
    """The environment a job trains in: a built-in stand-in build by name, or an uploaded build."""

    builtin: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        errors = _env_errors(self.builtin, self.sha256)
        if errors:
            raise JobSpecError(errors)

    def to_dict(self) -> dict[str, str]:
        """The JSON form: {"builtin": name} or {"sha256": hash}."""
        if self.builtin is not None:
            return {"builtin": self.builtin}
        assert self.sha256 is not None
        return {"sha256": self.sha256}


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec; constructing one checks every field and parses the trainer config."""

    config: str  # the ML-Agents trainer configuration YAML, exactly as submitted
    env: EnvRef
    seed: int = 0
    max_steps: int | None = None  # when set, overrides every behaviour's max_steps
    num_envs: int = 1
    time_limit_s: int = 3600
    _trainer_config: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        errors = [] if isinstance(self.env, EnvRef) else [FieldError("env", "must be an EnvRef")]
        errors += _number_errors(
            {
                "seed": self.seed,
                "max_steps": self.max_steps,
                "num_envs": self.num_envs,
                "time_limit_s": self.time_limit_s,
            }
        )
        trainer_config, config_errors = _checked_config(self.config)
        errors += config_errors
        if errors:
            raise JobSpecError(errors)
        # Parsed once here; the dataclass is frozen, so set it the way dataclasses do.
        object.__setattr__(self, "_trainer_config", trainer_config)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, which parse_job_spec turns back into an equal spec."""
        return {
            "config": self.config,
            "env": self.env.to_dict(),
            "seed": self.seed,
            "max_steps": self.max_steps,
            "num_envs": self.num_envs,
            "time_limit_s": self.time_limit_s,
        }

    def trainer_config(self) -> dict[str, Any]:
        """The configuration for mlagents-learn, with max_steps applied to every behaviour."""
        config = copy.deepcopy(self._trainer_config)  # callers may change their copy
        if self.max_steps is not None:
            for settings in config["behaviors"].values():
                settings["max_steps"] = self.max_steps
        return config

    @property
    def behavior_names(self) -> list[str]:
        """The behaviours the configuration trains, in the order it lists them."""
        return list(self._trainer_config["behaviors"])


def parse_job_spec(data: object) -> JobSpec:
    """Build a JobSpec from a JSON request body or a stored dict; raises JobSpecError."""
    if not isinstance(data, dict):
        raise JobSpecError.single("spec", f"must be a JSON object, got {_json_kind(data)}")
    errors: list[FieldError] = []
    for key in data:
        if key not in _SPEC_FIELDS:
            name = key if isinstance(key, str) and key else repr(key)
            errors.append(
                FieldError(name, f"is not a job spec field; use {', '.join(_SPEC_FIELDS)}")
            )
    for key, what in (
        ("config", "the ML-Agents trainer configuration as YAML text"),
        ("env", 'the environment, {"builtin": name} or {"sha256": hash}'),
    ):
        if key not in data:
            errors.append(FieldError(key, f"is required: {what}"))
    env = _parse_env(data["env"], errors) if "env" in data else None
    numbers: dict[str, Any] = {name: data.get(name, d) for name, d in _DEFAULTS.items()}
    errors += _number_errors(numbers)
    if errors or env is None:
        # Report the configuration's own problems along with the rest.
        if "config" in data:
            errors += _checked_config(data["config"])[1]
        raise JobSpecError(errors)
    return JobSpec(config=data["config"], env=env, **numbers)


def parse_trainer_config(text: object) -> dict[str, Any]:
    """Parse and validate trainer configuration YAML text; errors name fields under `config`."""
    if not isinstance(text, str):
        raise JobSpecError.single(
            "config", f"must be the trainer configuration as YAML text, got {_json_kind(text)}"
        )
    # Checking the length in characters first spares encoding a huge string.
    if (
        len(text) > MAX_CONFIG_BYTES
        or len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES
    ):
        raise JobSpecError.single("config", f"is larger than the limit of {MAX_CONFIG_BYTES} bytes")
    if not text.strip():
        raise JobSpecError.single(
            "config", "is empty: it must be an ML-Agents trainer configuration with behaviors"
        )
    return validate_trainer_config(_load_yaml(text))


def _checked_config(config: object) -> tuple[dict[str, Any], list[FieldError]]:
    try:
        return parse_trainer_config(config), []
    except JobSpecError as e:
        return {}, e.errors


def _parse_env(raw: object, errors: list[FieldError]) -> EnvRef | None:
    if not isinstance(raw, dict):
        errors.append(
            FieldError("env", f'must be an object like {{"builtin": name}}, got {_json_kind(raw)}')
        )
        return None
    for key in raw:
        if key not in ("builtin", "sha256"):
            errors.append(FieldError(f"env.{key}", "is not an env field; use builtin or sha256"))
    env_errors = _env_errors(raw.get("builtin"), raw.get("sha256"))
    errors += env_errors
    if env_errors or len(raw) > 2:
        return None
    return EnvRef(builtin=raw.get("builtin"), sha256=raw.get("sha256"))


def _env_errors(builtin: object, sha256: object) -> list[FieldError]:
    errors: list[FieldError] = []
    if builtin is not None and not (isinstance(builtin, str) and _BUILTIN_NAME.fullmatch(builtin)):
        errors.append(
            FieldError(
                "env.builtin",
                "must be a built-in environment name: a lowercase letter, then up to 63 lowercase "
                f"letters, digits, '_' or '-'; got {_brief(builtin)}",
            )
        )
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        errors.append(
            FieldError(
                "env.sha256",
                "must be an uploaded build's SHA-256, 64 lowercase hex digits; "
                f"got {_brief(sha256)}",
            )
        )
    if builtin is None and sha256 is None:
        errors.append(
            FieldError(
                "env", "needs builtin (a built-in environment) or sha256 (an uploaded build)"
            )
        )
    elif builtin is not None and sha256 is not None:
        errors.append(FieldError("env", "must set exactly one of builtin and sha256, not both"))
    return errors


def _number_errors(values: dict[str, object]) -> list[FieldError]:
    errors: list[FieldError] = []
    for name, (low, high) in _LIMITS.items():
        value = values[name]
        if name == "max_steps" and value is None:
            continue
        # bool is an int in Python, but `seed: true` is a mistake, not a seed of 1.
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(FieldError(name, f"must be an integer, got {_json_kind(value)}"))
        elif not low <= value <= high:
            errors.append(FieldError(name, f"must be between {low} and {high}, got {value}"))
    return errors


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kinds |= {dict: "an object", list: "an array"}
    return kinds.get(type(value), type(value).__name__)


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


# --- bounded YAML parsing ------------------------------------------------------------------------

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


def _load_yaml(text: str) -> object:
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
