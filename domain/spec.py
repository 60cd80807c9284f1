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

from domain.errors import FieldError, JobSpecError
from domain.safe_yaml import load_yaml
from domain.trainer_config import validate_trainer_config

__all__ = ["EnvRef", "JobSpec", "parse_job_spec", "parse_trainer_config"]

MAX_CONFIG_BYTES: Final = 256 * 1024

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
    return validate_trainer_config(load_yaml(text))


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
