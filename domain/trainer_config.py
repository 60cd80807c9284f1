"""The ML-Agents 1.1.0 trainer configuration schema, checked on parsed YAML values.

The schema is ML-Agents' own (`mlagents/trainers/settings.py` and the PPO, SAC and POCA settings
classes), reproduced here because the central node does not load mlagents. Like ML-Agents we accept
numbers written as strings that YAML 1.1 reads as text (`learning_rate: 3e-4`), integer text for
integer fields (`batch_size: "64"`) and `max_steps` as a float (`5.0e5`). `default_settings` applies
under every behaviour the way ML-Agents merges it, including ML-Agents' refusal of a behaviour whose
trainer_type cannot take default_settings' hyperparameters. The YAML text itself is parsed (with its
own limits) by `domain.spec.parse_trainer_config`.

Stricter than ML-Agents 1.1.0, on purpose:
- unknown keys are errors everywhere; ML-Agents ignores them in network_settings, memory, self_play,
  behavioral_cloning, completion_criteria, a reward signal's network_settings and a sampler mapping;
- booleans must be true/false (ML-Agents takes any value's truthiness, so "no" means true);
  integers and floats must not be booleans; an integer field takes no fractional value (ML-Agents
  truncates 10.7 to 10); floats must be finite (no NaN or infinity); a constant environment
  parameter must be a number, not a boolean;
- names and paths must be strings (ML-Agents str()s anything), and mapping keys must be strings;
- behaviour names: 1-128 printable characters without "/", "\\" or "?" and not "." or "..",
  because they become directory and file names on the train node and "?" separates the team id;
- init_path and demo_path must be relative paths without "..", so a job cannot read files
  elsewhere on the train node;
- `behaviors` is required and non-empty, `reward_signals` non-empty, a curriculum non-empty, a
  multirangeuniform sampler needs at least one interval and every interval exactly two values
  (ML-Agents silently drops extra values);
- keep_checkpoints >= 1 (0 makes ML-Agents divide by zero with even_checkpoints);
- batch_size <= buffer_size for every trainer type (otherwise no update ever runs);
- completion_criteria.behavior must name a behaviour in `behaviors` (ML-Agents fails mid-run);
- a Gaussian sampler's st_dev must be >= 0;
- ranges on sizes, counts, rates and coefficients, each stated where the field is declared;
- env_settings, checkpoint_settings, torch_settings and debug are refused: Trainyard sets them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Final

from domain.errors import FieldError, JobSpecError

_FIELD = "config"

# --- value checks ---------------------------------------------------------------------------------


class _Invalid:
    """Marks a value that failed its check (the error is already recorded)."""


_INVALID: Final = _Invalid()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_Check = Callable[[object, str, list[FieldError]], object]


def _fail(errors: list[FieldError], path: str, reason: str) -> _Invalid:
    errors.append(FieldError(path, reason))
    return _INVALID


def _kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return kinds.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _got(value: object) -> str:
    """What a value is, for a reason: "a string 'abc'", "null"."""
    return "null" if value is None else f"{_kind(value)} {_show(value)}"


def _to_int(value: object, path: str, errors: list[FieldError], via_float: bool) -> int | _Invalid:
    """ML-Agents' int(value), or int(float(value)) for max_steps, minus its surprises."""
    number: object = value
    if isinstance(value, str):
        try:
            number = float(value) if via_float else int(value)
        except ValueError:
            return _fail(errors, path, f"must be an integer, got {_show(value)}")
    if isinstance(number, float):
        if not number.is_integer():
            return _fail(errors, path, f"must be a whole number, got {_show(value)}")
        return int(number)
    if isinstance(number, int) and not isinstance(number, bool):
        return number
    return _fail(errors, path, f"must be an integer, got {_got(value)}")


def _int(low: int, high: int, *, via_float: bool = False) -> _Check:
    def check(value: object, path: str, errors: list[FieldError]) -> object:
        number = _to_int(value, path, errors, via_float)
        if isinstance(number, int) and not low <= number <= high:
            return _fail(errors, path, f"must be between {low} and {high}, got {number}")
        return number

    return check


def _float(
    low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> _Check:
    def check(value: object, path: str, errors: list[FieldError]) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return _fail(errors, path, f"must be a number, got {_got(value)}")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return _fail(errors, path, f"must be a number, got {_show(value)}")
        if not math.isfinite(number):
            return _fail(errors, path, f"must be a finite number, got {_show(value)}")
        too_low = low is not None and (number <= low if open_low else number < low)
        if too_low or (high is not None and number > high):
            lower = "" if low is None else f"{'>' if open_low else '>='} {low}"
            upper = "" if high is None else f"<= {high}"
            bounds = " and ".join(b for b in (lower, upper) if b)
            return _fail(errors, path, f"must be {bounds}, got {number}")
        return number

    return check


def _bool(value: object, path: str, errors: list[FieldError]) -> object:
    if not isinstance(value, bool):
        return _fail(errors, path, f"must be true or false, got {_got(value)}")
    return value


def _choice(*options: str) -> _Check:
    def check(value: object, path: str, errors: list[FieldError]) -> object:
        if not isinstance(value, str) or value not in options:
            allowed = ", ".join(options)
            return _fail(errors, path, f"must be one of {allowed}; got {_show(value)}")
        return value

    return check


def _text(value: object, path: str, errors: list[FieldError]) -> object:
    # Names and paths end up in file names, logs and Unity; control characters have no place there.
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > 256
        or _CONTROL.search(value)
    ):
        return _fail(
            errors,
            path,
            f"must be a non-empty string of at most 256 printable characters, got {_show(value)}",
        )
    return value


def _relative_path(value: object, path: str, errors: list[FieldError]) -> object:
    text = _text(value, path, errors)
    if isinstance(text, str):
        parts = re.split(r"[/\\]", text)
        if text.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", text) or ".." in parts:
            return _fail(
                errors, path, f"must be a relative path without '..' inside the job, got {text!r}"
            )
    return text


def _nullable(check: _Check) -> _Check:
    def nullable(value: object, path: str, errors: list[FieldError]) -> object:
        return None if value is None else check(value, path, errors)

    return nullable


def _mapping(value: object, path: str, errors: list[FieldError]) -> dict[str, Any] | _Invalid:
    """Check that value is a mapping with string keys; returns it, or _INVALID."""
    if not isinstance(value, dict):
        return _fail(errors, path, f"must be a mapping, got {_got(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    for key in bad:
        _fail(errors, f"{path}.{key}", f"key must be a string, got {_kind(key)}; quote it")
    return _INVALID if bad else value


def _struct(name: str, fields: dict[str, _Check], required: tuple[str, ...] = ()) -> _Check:
    """A check for a mapping with exactly these keys, like ML-Agents' strict_to_cls."""

    def check(value: object, path: str, errors: list[FieldError]) -> object:
        return _fields(name, fields, required, value, path, errors)

    return check


def _fields(
    name: str,
    fields: dict[str, _Check],
    required: tuple[str, ...],
    value: object,
    path: str,
    errors: list[FieldError],
) -> dict[str, Any] | _Invalid:
    mapping = _mapping(value, path, errors)
    if isinstance(mapping, _Invalid):
        return mapping
    out: dict[str, Any] = {}
    for key, item in mapping.items():
        if key in fields:
            checked = fields[key](item, f"{path}.{key}", errors)
            if not isinstance(checked, _Invalid):
                out[key] = checked
        else:
            _fail(errors, f"{path}.{key}", f"is not a {name} option; it takes {', '.join(fields)}")
    for key in required:
        if key not in mapping:
            _fail(errors, f"{path}.{key}", f"is required in {name}")
    return out


# --- the schema -----------------------------------------------------------------------------------

# Every range below is generous for any real run and refuses typos and values that make no sense.

_SCHEDULE = _choice("constant", "linear")
_FINITE = _float()
_STEPS = _int(1, 10**9)  # a billion steps is weeks of training for any environment
_UNIT = _float(0, 1)
_RATE = _float(0, 1, open_low=True)  # a learning rate of 0 learns nothing; above 1 diverges
_STRENGTH = _float(0, 1000)  # a reward multiplier; a negative one would invert the signal
_WIDTH = _int(1, 4096)  # layer widths; 4096 is far beyond any ML-Agents example

_COMMON_HYPERPARAMETERS: Final[dict[str, _Check]] = {
    "batch_size": _int(1, 10**6),  # and <= buffer_size, checked per behaviour
    "buffer_size": _int(1, 10**7),  # 10M experiences already take tens of GB of memory
    "learning_rate": _RATE,
    "learning_rate_schedule": _SCHEDULE,
}
_ON_POLICY_HYPERPARAMETERS: Final[dict[str, _Check]] = {
    **_COMMON_HYPERPARAMETERS,
    "beta": _UNIT,  # entropy bonus; useful values are 1e-4 .. 1e-2
    "epsilon": _float(0, 1, open_low=True),  # PPO's clip range; 0 would freeze the policy
    "lambd": _UNIT,  # GAE lambda weighs returns, so it lies in [0, 1]
    "num_epoch": _int(1, 1000),
    "beta_schedule": _SCHEDULE,
    "epsilon_schedule": _SCHEDULE,
}
_HYPERPARAMETERS: Final[dict[str, dict[str, _Check]]] = {
    "ppo": {**_ON_POLICY_HYPERPARAMETERS, "shared_critic": _bool},
    "sac": {
        **_COMMON_HYPERPARAMETERS,
        "buffer_init_steps": _int(0, 10**7),  # at most the largest buffer
        "tau": _float(0, 1, open_low=True),  # target network update weight
        "steps_per_update": _float(0, 10**4, open_low=True),  # ML-Agents divides by it
        "save_replay_buffer": _bool,
        "init_entcoef": _float(0, 100, open_low=True),  # ML-Agents takes its log
        "reward_signal_steps_per_update": _float(0, 10**4, open_low=True),  # divided by, too
    },
    "poca": _ON_POLICY_HYPERPARAMETERS,
}
_TRAINER_TYPE = _choice(*_HYPERPARAMETERS)
# ML-Agents' (batch_size, buffer_size) defaults, for the checks across fields.
_DEFAULT_SIZES: Final = {"ppo": (1024, 10240), "sac": (128, 50000), "poca": (1024, 10240)}
_DEFAULT_SEQUENCE_LENGTH: Final = 64
_UNKNOWN_TYPE: Final = ""  # default_settings' trainer type when default_settings itself is broken


def _memory_size(value: object, path: str, errors: list[FieldError]) -> object:
    size = _int(2, 4096)(value, path, errors)  # an LSTM state; 4096 is far beyond useful
    if isinstance(size, int) and size % 2:
        return _fail(errors, path, f"must be even (ML-Agents splits the memory in two), got {size}")
    return size


_NETWORK = _struct(
    "network_settings",
    {
        "normalize": _bool,
        "hidden_units": _WIDTH,
        "num_layers": _int(1, 32),  # deeper plain MLPs do not train
        "vis_encode_type": _choice("fully_connected", "match3", "simple", "nature_cnn", "resnet"),
        "memory": _nullable(
            _struct(
                "memory",
                {
                    "sequence_length": _int(1, 10**6),  # and <= batch_size, checked per behaviour
                    "memory_size": _memory_size,
                },
            )
        ),
        "goal_conditioning_type": _choice("hyper", "none"),
        "deterministic": _bool,
    },
)

_EXTRINSIC: Final[dict[str, _Check]] = {
    "gamma": _float(0, 1, open_low=True),  # a discount: 0 ignores the future, above 1 diverges
    "strength": _STRENGTH,
    "network_settings": _NETWORK,
}
_INTRINSIC: Final[dict[str, _Check]] = {
    **_EXTRINSIC,
    "learning_rate": _RATE,
    "encoding_size": _nullable(_WIDTH),
}
_REWARD_SIGNALS: Final[dict[str, _Check]] = {
    "extrinsic": _struct("extrinsic reward signal", _EXTRINSIC),
    "gail": _struct(
        "gail reward signal",
        {**_INTRINSIC, "use_actions": _bool, "use_vail": _bool, "demo_path": _relative_path},
        required=("demo_path",),
    ),
    "curiosity": _struct("curiosity reward signal", _INTRINSIC),
    "rnd": _struct("rnd reward signal", _INTRINSIC),
}


def _reward_signals(value: object, path: str, errors: list[FieldError]) -> object:
    mapping = _mapping(value, path, errors)
    if isinstance(mapping, _Invalid):
        return mapping
    if not mapping:
        return _fail(errors, path, "needs at least one reward signal, such as extrinsic")
    out: dict[str, Any] = {}
    for name, settings in mapping.items():
        if name not in _REWARD_SIGNALS:
            known = ", ".join(_REWARD_SIGNALS)
            _fail(errors, f"{path}.{name}", f"is not a reward signal; ML-Agents has {known}")
            continue
        checked = _REWARD_SIGNALS[name](settings, f"{path}.{name}", errors)
        if not isinstance(checked, _Invalid):
            out[name] = checked
    return out


_TRAINER_FIELDS: Final[dict[str, _Check]] = {
    "checkpoint_interval": _STEPS,
    "network_settings": _NETWORK,
    "reward_signals": _reward_signals,
    "init_path": _nullable(_relative_path),
    "keep_checkpoints": _int(1, 1000),
    "even_checkpoints": _bool,
    "max_steps": _int(1, 10**9, via_float=True),  # the same bound as the job spec's max_steps
    "time_horizon": _int(1, 10**6),
    "summary_freq": _STEPS,
    "threaded": _bool,
    "self_play": _nullable(
        _struct(
            "self_play",
            {
                "save_steps": _STEPS,
                "team_change": _STEPS,
                "swap_steps": _STEPS,
                "window": _int(1, 1000),  # past policies kept in memory, each a whole network
                "play_against_latest_model_ratio": _UNIT,  # a probability
                "initial_elo": _FINITE,
            },
        )
    ),
    "behavioral_cloning": _nullable(
        _struct(
            "behavioral_cloning",
            {
                "demo_path": _relative_path,
                "steps": _int(0, 10**9),
                "strength": _STRENGTH,
                "samples_per_update": _int(0, 10**7),
                "num_epoch": _nullable(_int(1, 1000)),
                "batch_size": _nullable(_int(1, 10**6)),
            },
            required=("demo_path",),
        )
    ),
    # Deprecated: ML-Agents drops it with a warning, and old configurations still carry it.
    "framework": _text,
}


def _trainer_settings(
    value: object, path: str, errors: list[FieldError], inherited_type: str | None
) -> dict[str, Any] | _Invalid:
    """A behaviour's or default_settings' trainer settings; inherited_type is the default's."""
    mapping = _mapping(value, path, errors)
    if isinstance(mapping, _Invalid):
        return mapping
    trainer_type = mapping.get("trainer_type", inherited_type)
    out: dict[str, Any] = {}
    for key, item in mapping.items():
        item_path = f"{path}.{key}"
        checked: object
        if key == "trainer_type":
            checked = _TRAINER_TYPE(item, item_path, errors)
        elif key == "hyperparameters":
            checked = _hyperparameters(item, item_path, errors, trainer_type)
        elif key in _TRAINER_FIELDS:
            checked = _TRAINER_FIELDS[key](item, item_path, errors)
        else:
            settings = ["trainer_type", "hyperparameters", *_TRAINER_FIELDS]
            known = ", ".join(s for s in settings if s != "framework")
            checked = _fail(errors, item_path, f"is not a trainer setting; ML-Agents takes {known}")
        if not isinstance(checked, _Invalid):
            out[key] = checked
    return out


def _hyperparameters(
    value: object, path: str, errors: list[FieldError], trainer_type: object
) -> object:
    if trainer_type is None:
        return _fail(
            errors, path, "need trainer_type (ppo, sac or poca) to say which ones they are"
        )
    if not isinstance(trainer_type, str) or trainer_type not in _HYPERPARAMETERS:
        return _INVALID  # the trainer type is wrong and reported; there is nothing to check against
    return _fields(
        f"{trainer_type} hyperparameter", _HYPERPARAMETERS[trainer_type], (), value, path, errors
    )


def _check_combination(
    path: str, own: dict[str, Any], default: dict[str, Any] | None, errors: list[FieldError]
) -> None:
    """ML-Agents' rules across fields, on what a behaviour ends up with under default_settings."""
    inherited = default or {}
    default_type = inherited.get("trainer_type", "ppo")
    trainer_type = own.get("trainer_type", default_type)
    if default is not None and trainer_type != default_type:
        # ML-Agents starts every behaviour from all of default_settings' hyperparameters.
        wanted = _HYPERPARAMETERS[trainer_type]
        leftover = [k for k in _HYPERPARAMETERS[default_type] if k not in wanted]
        if leftover:
            _fail(
                errors,
                f"{path}.trainer_type",
                f"is {trainer_type} but default_settings is {default_type}: ML-Agents merges "
                f"default_settings' {default_type} hyperparameters ({', '.join(leftover)}) into "
                f"this behaviour and {trainer_type} does not take them; set trainer_type in each "
                "behaviour rather than in default_settings",
            )
            return
    hyper = {**inherited.get("hyperparameters", {}), **own.get("hyperparameters", {})}
    batch_default, buffer_default = _DEFAULT_SIZES[trainer_type]
    batch = hyper.get("batch_size", batch_default)
    buffer = hyper.get("buffer_size", buffer_default)
    if batch > buffer:
        _fail(
            errors,
            f"{path}.hyperparameters.batch_size",
            f"is {batch}, more than buffer_size {buffer}: no update would ever run",
        )
    memory = _effective_memory(
        own.get("network_settings", {}), inherited.get("network_settings", {})
    )
    if memory is not None:
        length = memory.get("sequence_length", _DEFAULT_SEQUENCE_LENGTH)
        if length > batch:
            _fail(
                errors,
                f"{path}.network_settings.memory.sequence_length",
                f"is {length}, more than hyperparameters.batch_size {batch}; with memory, "
                "ML-Agents needs sequence_length <= batch_size",
            )


def _effective_memory(own: dict[str, Any], inherited: dict[str, Any]) -> dict[str, Any] | None:
    """The memory settings after ML-Agents' deep merge of default_settings."""
    if "memory" not in own:
        memory: dict[str, Any] | None = inherited.get("memory")
        return memory
    if own["memory"] is not None and isinstance(inherited.get("memory"), dict):
        return {**inherited["memory"], **own["memory"]}
    mine: dict[str, Any] | None = own["memory"]
    return mine


# --- environment parameters -----------------------------------------------------------------------

_SEED = _int(-(2**31), 2**31 - 1)  # Unity samplers take a 32-bit seed; -1 means the run's seed
_SAMPLER_TYPE = _choice("uniform", "gaussian", "multirangeuniform", "constant")


def _intervals(value: object, path: str, errors: list[FieldError]) -> object:
    if not isinstance(value, list) or not value:
        return _fail(
            errors, path, f"must be a non-empty list of [min, max] pairs, got {_show(value)}"
        )
    out: list[list[float]] = []
    for i, interval in enumerate(value):
        item_path = f"{path}[{i}]"
        if not isinstance(interval, list) or len(interval) != 2:
            _fail(errors, item_path, f"must be a [min, max] pair, got {_show(interval)}")
            continue
        low = _FINITE(interval[0], f"{item_path}[0]", errors)
        high = _FINITE(interval[1], f"{item_path}[1]", errors)
        if isinstance(low, float) and isinstance(high, float):
            if low > high:
                _fail(errors, item_path, f"has min {low} greater than max {high}")
            out.append([low, high])
    return out


_SAMPLERS: Final[dict[str, _Check]] = {
    "uniform": _struct(
        "uniform sampler", {"seed": _SEED, "min_value": _FINITE, "max_value": _FINITE}
    ),
    "gaussian": _struct("gaussian sampler", {"seed": _SEED, "mean": _FINITE, "st_dev": _float(0)}),
    "multirangeuniform": _struct(
        "multirangeuniform sampler", {"seed": _SEED, "intervals": _intervals}
    ),
    "constant": _struct("constant sampler", {"seed": _SEED, "value": _FINITE}),
}


def _sampler(value: object, path: str, errors: list[FieldError]) -> object:
    """A constant number, or a mapping of sampler_type and sampler_parameters."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _FINITE(value, path, errors)
    if not isinstance(value, dict):
        return _fail(
            errors,
            path,
            "must be a number or a sampler mapping (sampler_type, sampler_parameters), "
            f"got {_got(value)}",
        )
    before = len(errors)
    mapping = _mapping(value, path, errors)
    if isinstance(mapping, _Invalid):
        return mapping
    for key in mapping:
        if key not in ("sampler_type", "sampler_parameters"):
            _fail(
                errors,
                f"{path}.{key}",
                "is not a sampler option; a sampler has sampler_type and sampler_parameters",
            )
    for key in ("sampler_type", "sampler_parameters"):
        if key not in mapping:
            _fail(errors, f"{path}.{key}", "is required in a sampler")
    if len(errors) > before:
        return _INVALID
    params_path = f"{path}.sampler_parameters"
    sampler_type = _SAMPLER_TYPE(mapping["sampler_type"], f"{path}.sampler_type", errors)
    if not isinstance(sampler_type, str):
        return _INVALID
    params = _SAMPLERS[sampler_type](mapping["sampler_parameters"], params_path, errors)
    if len(errors) > before or not isinstance(params, dict):
        return _INVALID
    if sampler_type == "uniform":
        low, high = params.get("min_value", 0.0), params.get("max_value", 1.0)
        if low > high:
            return _fail(
                errors, f"{params_path}.min_value", f"is {low}, more than max_value {high}"
            )
    return {"sampler_type": sampler_type, "sampler_parameters": params}


_COMPLETION_CRITERIA: Final[dict[str, _Check]] = {
    "behavior": _text,
    "measure": _choice("progress", "reward"),
    "min_lesson_length": _int(0, 10**6),  # episodes; more than any lesson needs
    "signal_smoothing": _bool,
    "threshold": _FINITE,
    "require_reset": _bool,
}


def _completion_criteria(
    value: object, path: str, errors: list[FieldError], behaviors: set[str] | None
) -> object:
    before = len(errors)
    out = _fields("completion_criteria", _COMPLETION_CRITERIA, ("behavior",), value, path, errors)
    if isinstance(out, _Invalid) or len(errors) > before:
        return _INVALID
    threshold = out.get("threshold", 0.0)
    if out.get("measure", "reward") == "progress" and not 0.0 <= threshold <= 1.0:
        _fail(
            errors,
            f"{path}.threshold",
            f"must be between 0 and 1 when measure is progress (a fraction of max_steps), "
            f"got {threshold}",
        )
    if behaviors is not None and out["behavior"] not in behaviors:
        _fail(
            errors,
            f"{path}.behavior",
            f"names no behaviour in behaviors ({', '.join(sorted(behaviors))}): "
            f"got {out['behavior']!r}",
        )
    return out


def _curriculum(
    mapping: dict[str, Any], path: str, errors: list[FieldError], behaviors: set[str] | None
) -> object:
    for key in mapping:
        if key != "curriculum":
            _fail(errors, f"{path}.{key}", "is not allowed next to curriculum")
    lessons = mapping["curriculum"]
    if not isinstance(lessons, list) or not lessons:
        return _fail(errors, f"{path}.curriculum", "must be a non-empty list of lessons")

    def completion(value: object, item_path: str, errs: list[FieldError]) -> object:
        return None if value is None else _completion_criteria(value, item_path, errs, behaviors)

    fields: dict[str, _Check] = {
        "value": _sampler,
        "name": _text,
        "completion_criteria": completion,
    }
    out: list[Any] = []
    for i, lesson in enumerate(lessons):
        lesson_path = f"{path}.curriculum[{i}]"
        checked = _fields("lesson", fields, ("value", "name"), lesson, lesson_path, errors)
        if isinstance(checked, dict):
            out.append(checked)
            if i < len(lessons) - 1 and lesson.get("completion_criteria") is None:
                _fail(
                    errors,
                    f"{lesson_path}.completion_criteria",
                    "is required on every lesson but the last: it says when to move on",
                )
    return {"curriculum": out}


def _environment_parameters(
    value: object, path: str, errors: list[FieldError], behaviors: set[str] | None
) -> object:
    if value is None:
        return None
    mapping = _mapping(value, path, errors)
    if isinstance(mapping, _Invalid):
        return mapping
    out: dict[str, Any] = {}
    for name, setting in mapping.items():
        item_path = f"{path}.{name}"
        if not name.strip() or len(name) > 256:
            _fail(errors, item_path, "must be a non-empty name of at most 256 characters")
        elif isinstance(setting, dict) and "curriculum" in setting:
            out[name] = _curriculum(setting, item_path, errors, behaviors)
        else:
            out[name] = _sampler(setting, item_path, errors)
    return out


# --- the whole configuration ----------------------------------------------------------------------

_ENGINE = _struct(
    "engine_settings",
    {
        "width": _int(1, 8192),  # pixels; headless training never needs more than 8K
        "height": _int(1, 8192),
        "quality_level": _int(0, 100),  # an index into the build's quality levels
        "time_scale": _float(0, 100, open_low=True),  # Unity refuses Time.timeScale above 100
        "target_frame_rate": _int(-1, 10_000),  # -1 means unlimited
        "capture_frame_rate": _int(0, 10_000),  # 0 turns fixed-rate capture off
        "no_graphics": _bool,
        "no_graphics_monitor": _bool,
    },
)
_SET_BY_TRAINYARD: Final = {
    "env_settings": "is set by Trainyard: use the job spec's env, seed and num_envs fields",
    "checkpoint_settings": "is set by the train node (run id, results directory, resume)",
    "torch_settings": "is set by the train node: the train node picks the device",
    "debug": "is set by the train node",
}
_SECTIONS: Final = ("behaviors", "default_settings", "environment_parameters", "engine_settings")
_BEHAVIOR_NAME = re.compile(r"[^/\\?\x00-\x1f\x7f]{1,128}")


def validate_trainer_config(data: object) -> dict[str, Any]:
    """Check parsed trainer configuration YAML against ML-Agents' schema; returns it normalized."""
    errors: list[FieldError] = []
    if not isinstance(data, dict):
        raise JobSpecError.single(
            _FIELD, f"must be a YAML mapping with a behaviors section, got {_kind(data)}"
        )
    mapping = _mapping(data, _FIELD, errors)
    if isinstance(mapping, _Invalid):
        raise JobSpecError(errors)
    for key in mapping:
        if key in _SET_BY_TRAINYARD:
            _fail(errors, f"{_FIELD}.{key}", _SET_BY_TRAINYARD[key])
        elif key not in _SECTIONS:
            _fail(
                errors,
                f"{_FIELD}.{key}",
                f"is not an ML-Agents section; use {', '.join(_SECTIONS)}",
            )
    out: dict[str, Any] = {}

    default: dict[str, Any] | None = None
    inherited_type: str | None = None
    if mapping.get("default_settings") is not None:
        path = f"{_FIELD}.default_settings"
        before = len(errors)
        checked = _trainer_settings(mapping["default_settings"], path, errors, None)
        if isinstance(checked, dict) and len(errors) == before:
            _check_combination(path, checked, None, errors)
        if isinstance(checked, dict) and len(errors) == before:
            default = checked
            inherited_type = checked.get("trainer_type", "ppo")
        else:
            inherited_type = _UNKNOWN_TYPE
        out["default_settings"] = checked
    elif "default_settings" in mapping:
        out["default_settings"] = None

    behaviors = _behaviors(mapping, errors, default, inherited_type)
    if behaviors is not None:
        out["behaviors"] = behaviors
    if "engine_settings" in mapping:
        out["engine_settings"] = _ENGINE(
            mapping["engine_settings"], f"{_FIELD}.engine_settings", errors
        )
    if "environment_parameters" in mapping:
        names = None if behaviors is None else set(behaviors)
        path = f"{_FIELD}.environment_parameters"
        out["environment_parameters"] = _environment_parameters(
            mapping["environment_parameters"], path, errors, names
        )
    if errors:
        raise JobSpecError(errors)
    return {key: out[key] for key in mapping if key in out}


def _behaviors(
    mapping: dict[str, Any],
    errors: list[FieldError],
    default: dict[str, Any] | None,
    inherited_type: str | None,
) -> dict[str, Any] | None:
    """The behaviors section; None when it is missing or not a mapping."""
    path = f"{_FIELD}.behaviors"
    if "behaviors" not in mapping:
        _fail(errors, path, "is required: a mapping from behaviour name to trainer settings")
        return None
    behaviors = _mapping(mapping["behaviors"], path, errors)
    if isinstance(behaviors, _Invalid):
        return None
    if not behaviors:
        _fail(errors, path, "must name at least one behaviour")
    out: dict[str, Any] = {}
    for name, settings in behaviors.items():
        item_path = f"{path}.{name}"
        if not _BEHAVIOR_NAME.fullmatch(name) or name in (".", "..") or not name.strip():
            _fail(
                errors,
                item_path,
                "is not a usable behaviour name: use 1-128 printable characters without "
                "'/', '\\' or '?'",
            )
            continue
        before = len(errors)
        checked = _trainer_settings(settings, item_path, errors, inherited_type)
        if isinstance(checked, dict) and len(errors) == before:
            if inherited_type != _UNKNOWN_TYPE:
                _check_combination(item_path, checked, default, errors)
            out[name] = checked
    return out
