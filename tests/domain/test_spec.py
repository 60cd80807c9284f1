"""The job spec takes the trainer configurations users have and refuses bad or hostile input."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.errors import FieldError, JobSpecError
from domain.spec import EnvRef, JobSpec, parse_job_spec, parse_trainer_config

# --- realistic configurations, shaped like ML-Agents' own example configs -------------------------

PPO_3DBALL = """\
behaviors:
  3DBall:
    trainer_type: ppo
    hyperparameters:
      batch_size: 64
      buffer_size: 12000
      learning_rate: 3e-4      # PyYAML reads this as the string "3e-4"; ML-Agents accepts it
      beta: 0.001
      epsilon: 0.2
      lambd: 0.99
      num_epoch: 3
      learning_rate_schedule: linear
    network_settings:
      normalize: true
      hidden_units: 128
      num_layers: 2
      vis_encode_type: simple
    reward_signals:
      extrinsic:
        gamma: 0.99
        strength: 1.0
    keep_checkpoints: 5
    max_steps: 5.0e5           # a string too, and a float: ML-Agents takes int(float(...))
    time_horizon: 1000
    summary_freq: 12000
"""

SAC_WALKER = """\
behaviors:
  Walker:
    trainer_type: sac
    hyperparameters:
      learning_rate: 0.0003
      learning_rate_schedule: constant
      batch_size: 1024
      buffer_size: 2000000
      buffer_init_steps: 0
      tau: 0.005
      steps_per_update: 30.0
      save_replay_buffer: false
      init_entcoef: 1.0
      reward_signal_steps_per_update: 30.0
    network_settings:
      normalize: true
      hidden_units: 256
      num_layers: 3
      vis_encode_type: simple
    reward_signals:
      extrinsic:
        gamma: 0.995
        strength: 1.0
    keep_checkpoints: 5
    max_steps: 15000000
    time_horizon: 1000
    summary_freq: 30000
engine_settings:
  time_scale: 20
  no_graphics: true
"""

POCA_SOCCER = """\
behaviors:
  SoccerTwos:
    trainer_type: poca
    hyperparameters:
      batch_size: 2048
      buffer_size: 20480
      learning_rate: 0.0003
      beta: 0.005
      epsilon: 0.2
      lambd: 0.95
      num_epoch: 3
      learning_rate_schedule: constant
    network_settings:
      normalize: false
      hidden_units: 512
      num_layers: 2
      vis_encode_type: simple
      goal_conditioning_type: none
    reward_signals:
      extrinsic:
        gamma: 0.99
        strength: 1.0
    keep_checkpoints: 5
    checkpoint_interval: 500000
    max_steps: 50000000
    time_horizon: 1000
    summary_freq: 10000
    self_play:
      save_steps: 50000
      team_change: 200000
      swap_steps: 2000
      window: 10
      play_against_latest_model_ratio: 0.5
      initial_elo: 1200.0
"""

# Two behaviours sharing settings through anchors, aliases and merge keys.
PPO_ANCHORS = """\
behaviors:
  Striker: &striker
    trainer_type: ppo
    hyperparameters: &hyper
      batch_size: 2048
      buffer_size: 20480
      learning_rate: 0.0003
      num_epoch: 3
    network_settings: &net
      hidden_units: 512
      num_layers: 2
    reward_signals:
      extrinsic: {gamma: 0.99, strength: 1.0}
    max_steps: 5000000
    time_horizon: 1000
  Goalie:
    <<: *striker
    hyperparameters:
      <<: *hyper
      batch_size: 1024
    network_settings:
      <<: *net
      normalize: true
    time_horizon: 500
"""

PPO_DEFAULT_SETTINGS = """\
default_settings:
  trainer_type: ppo
  hyperparameters:
    batch_size: 1024
    buffer_size: 10240
    learning_rate: 3.0e-4
  network_settings:
    hidden_units: 256
  max_steps: 2000000
behaviors:
  Crawler: {}
  Worm:
    hyperparameters:
      batch_size: 512
    network_settings:
      memory:
        sequence_length: 64
        memory_size: 128
"""

# WallJump's curriculum, plus every sampler type.
PPO_CURRICULUM = """\
behaviors:
  BigWallJump: &walljump
    trainer_type: ppo
    hyperparameters:
      batch_size: 128
      buffer_size: 2048
      learning_rate: 0.0003
      beta: 0.005
      epsilon: 0.2
      lambd: 0.95
      num_epoch: 3
      learning_rate_schedule: linear
    network_settings:
      normalize: false
      hidden_units: 256
      num_layers: 2
      vis_encode_type: simple
    reward_signals:
      extrinsic:
        gamma: 0.99
        strength: 1.0
    keep_checkpoints: 5
    max_steps: 20000000
    time_horizon: 128
    summary_freq: 20000
  SmallWallJump: *walljump
environment_parameters:
  big_wall_height:
    curriculum:
      - name: Lesson0
        completion_criteria:
          measure: progress
          behavior: BigWallJump
          signal_smoothing: true
          min_lesson_length: 100
          threshold: 0.1
        value:
          sampler_type: uniform
          sampler_parameters:
            min_value: 0.0
            max_value: 4.0
      - name: Lesson1
        completion_criteria:
          measure: progress
          behavior: BigWallJump
          signal_smoothing: true
          min_lesson_length: 100
          threshold: 0.3
        value:
          sampler_type: uniform
          sampler_parameters:
            min_value: 4.0
            max_value: 7.0
      - name: Lesson2
        value: 8.0
  small_wall_height:
    curriculum:
      - name: Lesson0
        completion_criteria:
          measure: reward
          behavior: SmallWallJump
          threshold: 0.5
          require_reset: true
        value: 1.5
      - name: Lesson1
        value: 2.0
  gravity:
    sampler_type: gaussian
    sampler_parameters: {mean: 9.8, st_dev: 0.5}
  mass:
    sampler_type: multirangeuniform
    sampler_parameters: {intervals: [[1, 2], [5.5, 8]], seed: 7}
  friction:
    sampler_type: constant
    sampler_parameters: {value: 0.6}
  scale: 1.5
"""

# Memory plus every intrinsic reward signal and behavioural cloning, like Pyramids with demos.
PPO_PYRAMIDS = """\
behaviors:
  Pyramids:
    trainer_type: ppo
    hyperparameters:
      batch_size: 128
      buffer_size: 2048
      learning_rate: 0.0003
      beta: 0.01
      epsilon: 0.2
      lambd: 0.95
      num_epoch: 3
      learning_rate_schedule: linear
    network_settings:
      normalize: false
      hidden_units: 512
      num_layers: 2
      vis_encode_type: nature_cnn
      memory:
        sequence_length: 64
        memory_size: 256
    reward_signals:
      extrinsic:
        gamma: 0.99
        strength: 1.0
      curiosity:
        gamma: 0.99
        strength: 0.02
        learning_rate: 0.0003
        network_settings:
          hidden_units: 256
      rnd:
        gamma: 0.99
        strength: 0.01
        learning_rate: 0.0001
        encoding_size: 64
      gail:
        gamma: 0.99
        strength: 0.01
        learning_rate: 0.0003
        use_actions: false
        use_vail: false
        demo_path: demos/ExpertPyramid.demo
    behavioral_cloning:
      demo_path: demos/ExpertPyramid.demo
      steps: 150000
      strength: 0.5
      samples_per_update: 0
    keep_checkpoints: 5
    even_checkpoints: true
    max_steps: 10000000
    time_horizon: 128
    summary_freq: 30000
    threaded: false
"""

VALID_CONFIGS: dict[str, str] = {
    "ppo_3dball": PPO_3DBALL,
    "sac_walker": SAC_WALKER,
    "poca_soccer": POCA_SOCCER,
    "ppo_anchors": PPO_ANCHORS,
    "ppo_default_settings": PPO_DEFAULT_SETTINGS,
    "ppo_curriculum": PPO_CURRICULUM,
    "ppo_pyramids": PPO_PYRAMIDS,
}
VALID_BEHAVIORS: dict[str, list[str]] = {
    "ppo_3dball": ["3DBall"],
    "sac_walker": ["Walker"],
    "poca_soccer": ["SoccerTwos"],
    "ppo_anchors": ["Striker", "Goalie"],
    "ppo_default_settings": ["Crawler", "Worm"],
    "ppo_curriculum": ["BigWallJump", "SmallWallJump"],
    "ppo_pyramids": ["Pyramids"],
}


def spec_of(config: str, **fields: Any) -> JobSpec:
    return parse_job_spec({"config": config, "env": {"builtin": "walker"}, **fields})


def rejection(action: Callable[[], object]) -> list[FieldError]:
    with pytest.raises(JobSpecError) as caught:
        action()
    return caught.value.errors


def reason_for(errors: list[FieldError], field: str) -> str:
    """The reason given for field; fails the test, listing what was reported, if there is none."""
    reasons = [e.reason for e in errors if e.field == field]
    assert reasons, f"no error for {field!r}; got {[str(e) for e in errors]}"
    return reasons[0]


def config_rejection(text: str, field: str) -> str:
    return reason_for(rejection(lambda: parse_trainer_config(text)), field)


def with_behavior(settings: str, extra: str = "") -> str:
    """A one-behaviour configuration with the given settings (YAML flow mapping) for behaviour A."""
    return f"behaviors:\n  A: {settings}\n{extra}"


# --- valid configurations ------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALID_CONFIGS)
def test_valid_configs_parse(name: str) -> None:
    spec = spec_of(VALID_CONFIGS[name])

    assert spec.behavior_names == VALID_BEHAVIORS[name]
    assert set(spec.trainer_config()["behaviors"]) == set(VALID_BEHAVIORS[name])


def test_numbers_written_as_strings_become_numbers() -> None:
    behavior = spec_of(PPO_3DBALL).trainer_config()["behaviors"]["3DBall"]

    assert behavior["hyperparameters"]["learning_rate"] == pytest.approx(3e-4)
    assert behavior["max_steps"] == 500_000
    assert isinstance(behavior["max_steps"], int)


def test_anchors_aliases_and_merge_keys_resolve() -> None:
    behaviors = spec_of(PPO_ANCHORS).trainer_config()["behaviors"]

    goalie = behaviors["Goalie"]
    assert goalie["hyperparameters"] == {
        "batch_size": 1024,
        "buffer_size": 20480,
        "learning_rate": 0.0003,
        "num_epoch": 3,
    }
    assert goalie["network_settings"] == {"hidden_units": 512, "num_layers": 2, "normalize": True}
    assert goalie["time_horizon"] == 500
    assert goalie["max_steps"] == 5_000_000  # from the merged striker
    assert behaviors["Striker"]["hyperparameters"]["batch_size"] == 2048


def test_curriculum_and_samplers_are_kept() -> None:
    params = spec_of(PPO_CURRICULUM).trainer_config()["environment_parameters"]

    lessons = params["big_wall_height"]["curriculum"]
    assert [lesson["name"] for lesson in lessons] == ["Lesson0", "Lesson1", "Lesson2"]
    assert lessons[0]["completion_criteria"]["threshold"] == 0.1
    assert lessons[2]["value"] == 8.0
    assert params["mass"]["sampler_parameters"]["intervals"] == [[1.0, 2.0], [5.5, 8.0]]
    assert params["scale"] == 1.5


def test_trainer_config_is_plain_json() -> None:
    for text in VALID_CONFIGS.values():
        config = spec_of(text).trainer_config()
        assert json.loads(json.dumps(config)) == config


# --- round trip and max_steps --------------------------------------------------------------------


@pytest.mark.parametrize("name", VALID_CONFIGS)
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"env": {"sha256": "ab" * 32}, "seed": 2**31 - 1, "max_steps": 10**9},
        {"seed": 42, "max_steps": 1, "num_envs": 16, "time_limit_s": 7 * 24 * 3600},
    ],
)
def test_round_trip_through_json(name: str, fields: dict[str, Any]) -> None:
    spec = spec_of(VALID_CONFIGS[name], **fields)

    again = parse_job_spec(json.loads(json.dumps(spec.to_dict())))

    assert again == spec
    assert again.trainer_config() == spec.trainer_config()


def test_defaults() -> None:
    spec = spec_of(PPO_3DBALL)

    assert (spec.seed, spec.max_steps, spec.num_envs, spec.time_limit_s) == (0, None, 1, 3600)
    assert spec.env == EnvRef(builtin="walker")
    assert spec.config == PPO_3DBALL


@pytest.mark.parametrize("name", VALID_CONFIGS)
def test_max_steps_overrides_every_behavior(name: str) -> None:
    config = spec_of(VALID_CONFIGS[name], max_steps=12_345).trainer_config()

    assert {b: s["max_steps"] for b, s in config["behaviors"].items()} == dict.fromkeys(
        VALID_BEHAVIORS[name], 12_345
    )


def test_without_max_steps_the_configs_own_apply() -> None:
    behaviors = spec_of(PPO_ANCHORS).trainer_config()["behaviors"]

    assert behaviors["Striker"]["max_steps"] == 5_000_000
    assert "max_steps" not in spec_of(PPO_DEFAULT_SETTINGS).trainer_config()["behaviors"]["Worm"]


def test_trainer_config_returns_a_copy() -> None:
    spec = spec_of(PPO_3DBALL, max_steps=100)

    spec.trainer_config()["behaviors"]["3DBall"]["hyperparameters"]["batch_size"] = 1

    assert spec.trainer_config()["behaviors"]["3DBall"]["hyperparameters"]["batch_size"] == 64


def test_spec_is_frozen_and_hashable() -> None:
    spec = spec_of(PPO_3DBALL)

    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
    assert {spec, spec_of(PPO_3DBALL)} == {spec}


def test_constructing_directly_validates() -> None:
    errors = rejection(lambda: JobSpec(config="behaviors: {}", env=EnvRef(builtin="a"), seed=-1))

    assert "between 0" in reason_for(errors, "seed")
    assert "at least one" in reason_for(errors, "config.behaviors")
    assert "exactly one" in reason_for(rejection(lambda: EnvRef(builtin="a", sha256="b")), "env")


# --- bad spec fields ------------------------------------------------------------------------------

GOOD: dict[str, Any] = {"config": PPO_3DBALL, "env": {"builtin": "walker"}}


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"colour": "red"}, "colour", "not a job spec field"),
        ({"config": None}, "config", "YAML text"),
        ({"config": {"behaviors": {}}}, "config", "YAML text"),
        ({"config": 5}, "config", "YAML text"),
        ({"env": "walker"}, "env", "must be an object"),
        ({"env": {}}, "env", "needs builtin"),
        ({"env": {"builtin": None}}, "env", "needs builtin"),
        ({"env": {"builtin": "walker", "sha256": "ab" * 32}}, "env", "exactly one"),
        ({"env": {"builtin": "walker", "path": "/tmp"}}, "env.path", "not an env field"),
        ({"env": {"builtin": "Walker"}}, "env.builtin", "lowercase"),
        ({"env": {"builtin": "1walker"}}, "env.builtin", "lowercase"),
        ({"env": {"builtin": "walker\n"}}, "env.builtin", "lowercase"),
        ({"env": {"builtin": "w" * 65}}, "env.builtin", "lowercase"),
        ({"env": {"builtin": "../etc"}}, "env.builtin", "lowercase"),
        ({"env": {"builtin": 7}}, "env.builtin", "lowercase"),
        ({"env": {"sha256": "AB" * 32}}, "env.sha256", "64 lowercase hex"),
        ({"env": {"sha256": "a" * 63}}, "env.sha256", "64 lowercase hex"),
        ({"seed": True}, "seed", "must be an integer, got a boolean"),
        ({"seed": 1.0}, "seed", "must be an integer"),
        ({"seed": "1"}, "seed", "must be an integer"),
        ({"seed": -1}, "seed", "between 0 and 2147483647"),
        ({"seed": 2**31}, "seed", "between 0 and 2147483647"),
        ({"max_steps": 0}, "max_steps", "between 1 and 1000000000"),
        ({"max_steps": 10**9 + 1}, "max_steps", "between 1 and 1000000000"),
        ({"max_steps": False}, "max_steps", "must be an integer"),
        ({"num_envs": 0}, "num_envs", "between 1 and 16"),
        ({"num_envs": 17}, "num_envs", "between 1 and 16"),
        ({"num_envs": None}, "num_envs", "must be an integer, got null"),
        ({"time_limit_s": 0}, "time_limit_s", "between 1 and 604800"),
        ({"time_limit_s": 7 * 24 * 3600 + 1}, "time_limit_s", "between 1 and 604800"),
    ],
)
def test_bad_spec_fields_are_named(changes: dict[str, Any], field: str, words: str) -> None:
    errors = rejection(lambda: parse_job_spec({**GOOD, **changes}))

    assert words in reason_for(errors, field)


@pytest.mark.parametrize("data", [None, [], "config", 5, [GOOD]])
def test_spec_must_be_an_object(data: object) -> None:
    assert "JSON object" in reason_for(rejection(lambda: parse_job_spec(data)), "spec")


def test_missing_fields_are_required() -> None:
    errors = rejection(lambda: parse_job_spec({}))

    assert "required" in reason_for(errors, "config")
    assert "required" in reason_for(errors, "env")


def test_all_problems_are_reported_together() -> None:
    data = {"config": with_behavior("{time_horizon: 0}"), "env": {"builtin": "X"}, "seed": True}

    errors = rejection(lambda: parse_job_spec(data))

    assert {e.field for e in errors} == {"env.builtin", "seed", "config.behaviors.A.time_horizon"}


# --- hostile YAML text ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n\t\n"])
def test_empty_config(text: str) -> None:
    assert "empty" in config_rejection(text, "config")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("behaviors:\n  A: {\n", "line 3, column 1"),
        ("behaviors:\n  A:\n    max_steps: [1, 2\n", "line 4, column 1"),
        ("behaviors:\n\tA: {}\n", "line 2, column 1"),
        ('behaviors:\n  A: {init_path: "abc}\n', "line 3, column 1"),
        ("behaviors: {A: {}}\n---\nbehaviors: {B: {}}\n", "line 2, column 1"),
        ("behaviors: *nowhere\n", "line 1, column 12"),
    ],
)
def test_malformed_yaml_reports_line_and_column(text: str, where: str) -> None:
    reason = config_rejection(text, "config")

    assert reason.startswith("is not valid YAML")
    assert where in reason


def test_forbidden_characters_are_reported() -> None:
    assert "U+0000" in config_rejection("behaviors:\n  A: {}\x00", "config")


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- a\n- b\n", "a list"), ("just text", "a string"), ("42", "an integer"), ("~", "null")],
)
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    assert f"must be a YAML mapping with a behaviors section, got {kind}" in config_rejection(
        text, "config"
    )


def test_comment_only_document_is_not_a_mapping() -> None:
    assert "got null" in config_rejection("# nothing here\n", "config")


def billion_laughs(levels: int = 9, fan_out: int = 9) -> str:
    lines = ['lol0: &lol0 "lol"']
    for i in range(1, levels + 1):
        refs = ", ".join([f"*lol{i - 1}"] * fan_out)
        lines.append(f"lol{i}: &lol{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_before_it_expands() -> None:
    # Fully expanded this is 9**9 (387 million) strings.
    assert "expands to more than 10000" in config_rejection(billion_laughs(), "config")


def test_alias_expansion_counts_every_use() -> None:
    # Only 10 + 10 + 101 nodes are written, but the expansion is over 10,000.
    text = "a: &a [" + ", ".join("x" * 100) + "]\nb: &b [" + ", ".join(["*a"] * 100) + "]\n"

    assert "expands to more than 10000" in config_rejection(text, "config")


def test_merge_key_bomb_is_refused() -> None:
    lines = ["m0: &m0 {k0: 0}"]
    for i in range(1, 30):
        refs = ", ".join(f"*m{j}" for j in range(i))
        lines.append(f"m{i}: &m{i} {{<<: [{refs}], k{i}: {i}}}")

    assert "expands to more than 10000" in config_rejection("\n".join(lines), "config")


def test_too_many_plain_nodes_are_refused() -> None:
    text = "behaviors:\n  A: {}\nmany: [" + ", ".join(["1"] * 12_000) + "]\n"

    assert "more than 10000 YAML nodes" in config_rejection(text, "config")


@pytest.mark.parametrize(
    "text", ["a: &a [*a]\n", "a: &a {b: *a}\n", "a: &a {<<: *a}\n", "a: &a [[[*a]]]\n"]
)
def test_recursive_aliases_are_refused(text: str) -> None:
    assert "recursive alias" in config_rejection(text, "config")


def test_deep_nesting_is_refused() -> None:
    assert "nested deeper than 32" in config_rejection("a: " + "[" * 100_000, "config")
    block = "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "x\n"
    assert "nested deeper than 32" in config_rejection(block, "config")


def test_aliases_cannot_smuggle_in_depth() -> None:
    deep = "[" * 20 + "1" + "]" * 20
    text = f"a: &a {deep}\nb: &b {'[' * 15}*a{']' * 15}\n"

    assert "nested deeper than 32 levels once aliases are expanded" in config_rejection(
        text, "config"
    )


def test_50_megabyte_config_is_refused_by_size() -> None:
    text = "behaviors:\n  A: {}\n# " + "x" * (50 * 1024 * 1024)

    assert "larger than the limit of 262144 bytes" in config_rejection(text, "config")


def test_size_limit_counts_utf8_bytes() -> None:
    text = "behaviors:\n  A: {}\n# " + "é" * (140 * 1024)  # 140 Ki characters, 280 KiB

    assert "larger than the limit" in config_rejection(text, "config")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("behaviors:\n  A: {}\n  A: {}\n", "config.behaviors.A"),
        ("behaviors:\n  A: {}\nbehaviors:\n  B: {}\n", "config.behaviors"),
        (
            with_behavior("{trainer_type: ppo, hyperparameters: {batch_size: 64, batch_size: 32}}"),
            "config.behaviors.A.hyperparameters.batch_size",
        ),
        ("behaviors:\n  A: {max_steps: 1, max_steps: 2}\n", "config.behaviors.A.max_steps"),
        ("behaviors:\n  A: {}\n  B: {}\n  1: {}\n  01: {}\n", "config.behaviors.1"),
    ],
)
def test_duplicate_keys_are_refused(text: str, field: str) -> None:
    reason = config_rejection(text, field)

    assert "duplicate key" in reason
    assert "last one" in reason


def test_merge_keys_are_not_duplicates() -> None:
    text = "behaviors:\n  A: &a {max_steps: 10}\n  B: {<<: *a, max_steps: 20}\n"

    assert parse_trainer_config(text)["behaviors"]["B"]["max_steps"] == 20


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        ("2020-01-01", "!!timestamp"),
        ("!!binary aGVsbG8=", "!!binary"),
        ("!!python/object/apply:os.system ['true']", "!!python/object/apply:os.system"),
        ("!!set {a, b}", "!!set"),
        ("!custom x", "!custom"),
        ("!!omap [a: 1]", "!!omap"),
    ],
)
def test_yaml_types_beyond_the_core_are_refused(value: str, tag: str) -> None:
    reason = config_rejection(
        with_behavior(f"{{init_path: {value}}}"), "config.behaviors.A.init_path"
    )

    assert f"YAML type {tag}" in reason


@pytest.mark.parametrize(
    ("value", "words"),
    [("!!int abc", "not a valid !!int"), ("!!bool maybe", "not a valid !!bool"), ("0b_", "valid")],
)
def test_explicit_tags_must_fit_the_value(value: str, words: str) -> None:
    reason = config_rejection(
        with_behavior(f"{{max_steps: {value}}}"), "config.behaviors.A.max_steps"
    )

    assert words in reason


def test_explicit_tags_that_fit_are_fine() -> None:
    text = with_behavior("{max_steps: !!int 100, init_path: !!str 123, summary_freq: !!float 10}")

    behavior = parse_trainer_config(text)["behaviors"]["A"]

    assert behavior == {"max_steps": 100, "init_path": "123", "summary_freq": 10}


def test_overlong_numbers_are_refused() -> None:
    text = with_behavior("{max_steps: " + "1" * 5000 + "}")

    assert "more than 64 characters" in config_rejection(text, "config.behaviors.A.max_steps")


# --- the trainer configuration schema -------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ("env_settings: {seed: 3}", "env, seed and num_envs"),
        ("checkpoint_settings: {run_id: x}", "set by the train node"),
        ("torch_settings: {device: cuda}", "picks the device"),
        ("debug: true", "set by the train node"),
    ],
)
def test_sections_trainyard_sets_are_refused(section: str, words: str) -> None:
    field = "config." + section.split(":")[0]

    assert words in config_rejection(with_behavior("{}", section + "\n"), field)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (with_behavior("{}", "colour: red\n"), "config.colour"),
        (with_behavior("{learning_rate: 0.1}"), "config.behaviors.A.learning_rate"),
        (
            with_behavior("{trainer_type: ppo, hyperparameters: {tau: 0.1}}"),
            "config.behaviors.A.hyperparameters.tau",
        ),
        (
            with_behavior("{trainer_type: sac, hyperparameters: {beta: 0.1}}"),
            "config.behaviors.A.hyperparameters.beta",
        ),
        (
            with_behavior("{trainer_type: poca, hyperparameters: {shared_critic: true}}"),
            "config.behaviors.A.hyperparameters.shared_critic",
        ),
        (
            with_behavior("{network_settings: {units: 5}}"),
            "config.behaviors.A.network_settings.units",
        ),
        (
            with_behavior("{network_settings: {memory: {size: 2}}}"),
            "config.behaviors.A.network_settings.memory.size",
        ),
        (
            with_behavior("{reward_signals: {extrinsic: {encoding_size: 3}}}"),
            "config.behaviors.A.reward_signals.extrinsic.encoding_size",
        ),
        (
            with_behavior("{reward_signals: {curiosity: {network_settings: {x: 1}}}}"),
            "config.behaviors.A.reward_signals.curiosity.network_settings.x",
        ),
        (with_behavior("{self_play: {rounds: 3}}"), "config.behaviors.A.self_play.rounds"),
        (
            with_behavior("{behavioral_cloning: {demo_path: a.demo, epochs: 3}}"),
            "config.behaviors.A.behavioral_cloning.epochs",
        ),
        (with_behavior("{}", "engine_settings: {fps: 30}\n"), "config.engine_settings.fps"),
        (
            with_behavior(
                "{}",
                "environment_parameters:\n  p: {sampler_type: constant, "
                "sampler_parameters: {value: 1}, extra: 2}\n",
            ),
            "config.environment_parameters.p.extra",
        ),
        (
            with_behavior(
                "{}",
                "environment_parameters:\n  p: {sampler_type: uniform, "
                "sampler_parameters: {low: 1}}\n",
            ),
            "config.environment_parameters.p.sampler_parameters.low",
        ),
        (
            with_behavior(
                "{}",
                "environment_parameters:\n  p: {curriculum: [{name: a, value: 1, weight: 3}]}\n",
            ),
            "config.environment_parameters.p.curriculum[0].weight",
        ),
        (
            with_behavior(
                "{}",
                "environment_parameters:\n  p: {curriculum: [{name: a, value: 1, "
                "completion_criteria: {behavior: A, level: 2}}, {name: b, value: 2}]}\n",
            ),
            "config.environment_parameters.p.curriculum[0].completion_criteria.level",
        ),
    ],
)
def test_unknown_keys_are_refused_at_every_level(text: str, field: str) -> None:
    reason = config_rejection(text, field)

    assert "is not a" in reason or "not allowed" in reason


@pytest.mark.parametrize(
    ("settings", "field", "words"),
    [
        ("{trainer_type: a2c}", "trainer_type", "must be one of ppo, sac, poca"),
        ("{hyperparameters: {batch_size: 64}}", "hyperparameters", "need trainer_type"),
        ("{trainer_type: ppo, hyperparameters: []}", "hyperparameters", "must be a mapping"),
        (
            "{network_settings: {vis_encode_type: vgg}}",
            "network_settings.vis_encode_type",
            "one of",
        ),
        (
            "{network_settings: {goal_conditioning_type: soft}}",
            "network_settings.goal_conditioning_type",
            "one of hyper, none",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {beta_schedule: cosine}}",
            "hyperparameters.beta_schedule",
            "one of constant, linear",
        ),
        (
            "{network_settings: {memory: {memory_size: 127}}}",
            "network_settings.memory.memory_size",
            "must be even",
        ),
        (
            "{network_settings: {memory: {memory_size: 0}}}",
            "network_settings.memory.memory_size",
            "between 2 and 4096",
        ),
        ("{network_settings: null}", "network_settings", "must be a mapping, got null"),
        ("{network_settings: {normalize: 'no'}}", "network_settings.normalize", "true or false"),
        (
            "{trainer_type: ppo, hyperparameters: {batch_size: abc}}",
            "hyperparameters.batch_size",
            "must be an integer",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {batch_size: 10.7}}",
            "hyperparameters.batch_size",
            "whole number",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {batch_size: true}}",
            "hyperparameters.batch_size",
            "must be an integer, got a boolean",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {batch_size: -64}}",
            "hyperparameters.batch_size",
            "between 1 and",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {buffer_size: 100000000}}",
            "hyperparameters.buffer_size",
            "between 1 and 10000000",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {learning_rate: 0}}",
            "hyperparameters.learning_rate",
            "must be > 0 and <= 1",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {learning_rate: .nan}}",
            "hyperparameters.learning_rate",
            "finite",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {learning_rate: nan}}",
            "hyperparameters.learning_rate",
            "finite",
        ),
        ("{trainer_type: ppo, hyperparameters: {beta: -.inf}}", "hyperparameters.beta", "finite"),
        (
            "{trainer_type: sac, hyperparameters: {steps_per_update: 0}}",
            "hyperparameters.steps_per_update",
            "must be > 0",
        ),
        (
            "{network_settings: {hidden_units: 10000}}",
            "network_settings.hidden_units",
            "between 1 and 4096",
        ),
        ("{network_settings: {num_layers: 33}}", "network_settings.num_layers", "between 1 and 32"),
        ("{time_horizon: 10000000}", "time_horizon", "between 1 and 1000000"),
        ("{time_horizon: -5}", "time_horizon", "between 1 and 1000000"),
        ("{max_steps: 2.0e+9}", "max_steps", "between 1 and 1000000000"),
        ("{max_steps: 10.5}", "max_steps", "whole number"),
        ("{keep_checkpoints: 0}", "keep_checkpoints", "between 1 and 1000"),
        ("{summary_freq: 0}", "summary_freq", "between 1 and"),
        (
            "{reward_signals: {extrinsic: {gamma: 1.5}}}",
            "reward_signals.extrinsic.gamma",
            "must be > 0 and <= 1",
        ),
        ("{reward_signals: {extrinsic: {gamma: 0}}}", "reward_signals.extrinsic.gamma", "> 0"),
        (
            "{reward_signals: {extrinsic: {strength: -1}}}",
            "reward_signals.extrinsic.strength",
            ">= 0",
        ),
        ("{reward_signals: {}}", "reward_signals", "at least one reward signal"),
        ("{reward_signals: {extrinsic: null}}", "reward_signals.extrinsic", "must be a mapping"),
        ("{reward_signals: {bonus: {}}}", "reward_signals.bonus", "not a reward signal"),
        ("{reward_signals: {gail: {strength: 0.1}}}", "reward_signals.gail.demo_path", "required"),
        (
            "{reward_signals: {gail: {demo_path: /etc/passwd}}}",
            "reward_signals.gail.demo_path",
            "relative path",
        ),
        ("{behavioral_cloning: {steps: 10}}", "behavioral_cloning.demo_path", "required"),
        (
            "{behavioral_cloning: {demo_path: ../../secrets.demo}}",
            "behavioral_cloning.demo_path",
            "relative path",
        ),
        ("{init_path: 'C:\\\\models\\\\x.pt'}", "init_path", "relative path"),
        ("{init_path: 5}", "init_path", "must be a non-empty string"),
        (
            "{self_play: {play_against_latest_model_ratio: 2}}",
            "self_play.play_against_latest_model_ratio",
            "<= 1",
        ),
    ],
)
def test_bad_trainer_settings_are_named(settings: str, field: str, words: str) -> None:
    assert words in config_rejection(with_behavior(settings), f"config.behaviors.A.{field}")


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("colour: red\n", "config.behaviors", "is required"),
        ("behaviors: {}\n", "config.behaviors", "at least one behaviour"),
        ("behaviors: [A]\n", "config.behaviors", "must be a mapping, got a list"),
        ("behaviors:\n  A:\n", "config.behaviors.A", "must be a mapping, got null"),
        ("behaviors:\n  1: {}\n", "config.behaviors.1", "must be a string"),
        ("behaviors:\n  a/b: {}\n", "config.behaviors.a/b", "behaviour name"),
        ("behaviors:\n  'A?team=0': {}\n", "config.behaviors.A?team=0", "behaviour name"),
        ("behaviors:\n  '..': {}\n", "config.behaviors...", "behaviour name"),
        (with_behavior("{}", "engine_settings:\n"), "config.engine_settings", "must be a mapping"),
        (
            with_behavior("{}", "engine_settings: {time_scale: 1000}\n"),
            "config.engine_settings.time_scale",
            "<= 100",
        ),
        (
            with_behavior("{}", "engine_settings: {width: 0}\n"),
            "config.engine_settings.width",
            "between 1 and 8192",
        ),
    ],
)
def test_bad_sections_are_named(text: str, field: str, words: str) -> None:
    assert words in config_rejection(text, field)


@pytest.mark.parametrize(
    ("settings", "default", "field", "words"),
    [
        # ML-Agents' own rule: a recurrent sequence must fit in a batch.
        (
            "{trainer_type: ppo, hyperparameters: {batch_size: 32}, network_settings: {memory: "
            "{sequence_length: 64}}}",
            "",
            "network_settings.memory.sequence_length",
            "more than hyperparameters.batch_size 32",
        ),
        # The same, with batch_size from default_settings and memory from the behaviour.
        (
            "{network_settings: {memory: {sequence_length: 128}}}",
            "default_settings: {trainer_type: ppo, hyperparameters: {batch_size: 64}}\n",
            "network_settings.memory.sequence_length",
            "more than hyperparameters.batch_size 64",
        ),
        # And with ML-Agents' default batch_size for SAC (128).
        (
            "{trainer_type: sac, network_settings: {memory: {sequence_length: 256}}}",
            "",
            "network_settings.memory.sequence_length",
            "batch_size 128",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {batch_size: 4096, buffer_size: 1024}}",
            "",
            "hyperparameters.batch_size",
            "more than buffer_size 1024",
        ),
        (
            "{trainer_type: ppo, hyperparameters: {batch_size: 20000}}",
            "",
            "hyperparameters.batch_size",
            "more than buffer_size 10240",
        ),
        (
            "{trainer_type: sac}",
            "default_settings: {trainer_type: ppo}\n",
            "trainer_type",
            "default_settings is ppo",
        ),
        (
            "{trainer_type: poca}",
            "default_settings: {max_steps: 100}\n",
            "trainer_type",
            "shared_critic",
        ),
    ],
)
def test_rules_across_fields(settings: str, default: str, field: str, words: str) -> None:
    text = default + with_behavior(settings)

    assert words in config_rejection(text, f"config.behaviors.A.{field}")


def test_default_settings_are_checked_on_their_own() -> None:
    text = "default_settings: {hyperparameters: {batch_size: 64}}\n" + with_behavior("{}")

    assert "need trainer_type" in config_rejection(text, "config.default_settings.hyperparameters")


def test_default_settings_give_their_trainer_type_to_behaviors() -> None:
    text = "default_settings: {trainer_type: sac}\n" + with_behavior(
        "{hyperparameters: {tau: 0.01}}"
    )

    assert parse_trainer_config(text)["behaviors"]["A"]["hyperparameters"] == {"tau": 0.01}


ENV_PARAMS = "environment_parameters:\n  p: "


@pytest.mark.parametrize(
    ("param", "field", "words"),
    [
        (
            "{sampler_type: uniform, sampler_parameters: {min_value: 5, max_value: 1}}",
            "p.sampler_parameters.min_value",
            "more than max_value",
        ),
        (
            "{sampler_type: uniform, sampler_parameters: {min_value: 5}}",
            "p.sampler_parameters.min_value",
            "more than max_value 1.0",
        ),
        (
            "{sampler_type: multirangeuniform, sampler_parameters: {intervals: [[1, 2], [9, 3]]}}",
            "p.sampler_parameters.intervals[1]",
            "min 9.0 greater than max 3.0",
        ),
        (
            "{sampler_type: multirangeuniform, sampler_parameters: {intervals: [[1, 2, 3]]}}",
            "p.sampler_parameters.intervals[0]",
            "[min, max] pair",
        ),
        (
            "{sampler_type: multirangeuniform, sampler_parameters: {intervals: []}}",
            "p.sampler_parameters.intervals",
            "non-empty list",
        ),
        (
            "{sampler_type: gaussian, sampler_parameters: {st_dev: -1}}",
            "p.sampler_parameters.st_dev",
            ">= 0",
        ),
        ("{sampler_type: beta, sampler_parameters: {}}", "p.sampler_type", "one of uniform"),
        ("{sampler_type: uniform}", "p.sampler_parameters", "required"),
        (
            "{sampler_type: uniform, sampler_parameters: null}",
            "p.sampler_parameters",
            "must be a mapping",
        ),
        ("'1.0'", "p", "must be a number or a sampler mapping"),
        ("true", "p", "got a boolean true"),
        ("null", "p", "got null"),
        ("{curriculum: []}", "p.curriculum", "non-empty list of lessons"),
        (
            "{curriculum: [{name: a, value: 1}, {name: b, value: 2}]}",
            "p.curriculum[0].completion_criteria",
            "every lesson but the last",
        ),
        ("{curriculum: [{value: 1}]}", "p.curriculum[0].name", "required"),
        ("{curriculum: [{name: a}]}", "p.curriculum[0].value", "required"),
        (
            "{curriculum: [{name: a, value: 1, completion_criteria: {threshold: 0.5}}, "
            "{name: b, value: 2}]}",
            "p.curriculum[0].completion_criteria.behavior",
            "required",
        ),
        (
            "{curriculum: [{name: a, value: 1, completion_criteria: {behavior: B}}, "
            "{name: b, value: 2}]}",
            "p.curriculum[0].completion_criteria.behavior",
            "names no behaviour",
        ),
        (
            "{curriculum: [{name: a, value: 1, completion_criteria: {behavior: A, "
            "measure: progress, threshold: 1.5}}, {name: b, value: 2}]}",
            "p.curriculum[0].completion_criteria.threshold",
            "between 0 and 1",
        ),
        (
            "{curriculum: [{name: a, value: 1, completion_criteria: {behavior: A, measure: "
            "steps}}, {name: b, value: 2}]}",
            "p.curriculum[0].completion_criteria.measure",
            "one of progress, reward",
        ),
    ],
)
def test_bad_environment_parameters_are_named(param: str, field: str, words: str) -> None:
    text = with_behavior("{}", ENV_PARAMS + param + "\n")

    assert words in config_rejection(text, f"config.environment_parameters.{field}")


def test_reward_threshold_may_exceed_one() -> None:
    criteria = "{behavior: A, measure: reward, threshold: 5}"
    text = with_behavior(
        "{}",
        f"{ENV_PARAMS}{{curriculum: [{{name: a, value: 1, completion_criteria: "
        f"{criteria}}}, {{name: b, value: 2}}]}}\n",
    )

    assert (
        parse_trainer_config(text)["environment_parameters"]["p"]["curriculum"][0][
            "completion_criteria"
        ]["threshold"]
        == 5.0
    )


def test_every_problem_in_a_config_is_reported() -> None:
    text = (
        "behaviors:\n"
        "  A: {trainer_type: ppo, hyperparameters: {batch_size: 0, beta: 9}, colour: red}\n"
        "  B: {time_horizon: 0}\n"
        "engine_settings: {width: -1}\n"
        "torch_settings: {}\n"
    )

    errors = rejection(lambda: parse_trainer_config(text))

    assert {e.field for e in errors} == {
        "config.behaviors.A.hyperparameters.batch_size",
        "config.behaviors.A.hyperparameters.beta",
        "config.behaviors.A.colour",
        "config.behaviors.B.time_horizon",
        "config.engine_settings.width",
        "config.torch_settings",
    }


def test_errors_read_well() -> None:
    errors = rejection(lambda: parse_trainer_config(with_behavior("{time_horizon: 0}")))

    assert str(JobSpecError(errors)) == (
        "config.behaviors.A.time_horizon: must be between 1 and 1000000, got 0"
    )


# --- nothing but JobSpecError, whatever the input -------------------------------------------------

YAML_ALPHABET = st.sampled_from(
    [
        *":-{}[],&*!|>#'\"\n\t ?%@`<=~.0123456789eE+_abAB",
        *["behaviors", "trainer_type", "ppo", "hyperparameters", "<<", "true", "null", ".nan"],
        *["- ", "\n  ", "é", "\x00", "\ufeff"],
    ]
)

ML_AGENTS_KEYS = st.sampled_from(
    [
        "behaviors",
        "default_settings",
        "environment_parameters",
        "engine_settings",
        "A",
        "trainer_type",
        "hyperparameters",
        "network_settings",
        "reward_signals",
        "memory",
        "batch_size",
        "buffer_size",
        "sequence_length",
        "memory_size",
        "max_steps",
        "extrinsic",
        "gail",
        "demo_path",
        "curriculum",
        "sampler_type",
        "sampler_parameters",
        "intervals",
        "completion_criteria",
        "behavior",
        "value",
        "name",
        "self_play",
        "min_value",
        "measure",
    ]
)
ML_AGENTS_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["ppo", "sac", "poca", "uniform", "progress", "3e-4", "A", "linear"]),
)
CONFIG_DATA = st.recursive(
    ML_AGENTS_VALUES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(ML_AGENTS_KEYS | st.integers(0, 3), children, max_size=5)
    ),
    max_leaves=40,
)
JSON_DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["config", "env", "seed", "builtin", "sha256", "x"])
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def accepted_or_spec_error(action: Callable[[], object]) -> None:
    """Run action; anything it raises other than a well-formed JobSpecError fails the test."""
    errors: list[FieldError] = []
    try:
        action()
    except JobSpecError as e:
        errors = e.errors
    assert all(err.field and err.reason for err in errors)


@FUZZ
@given(st.text(max_size=300))
def test_random_text_raises_only_spec_errors(text: str) -> None:
    accepted_or_spec_error(lambda: parse_trainer_config(text))


@FUZZ
@given(st.lists(YAML_ALPHABET, max_size=80).map("".join))
def test_random_yaml_like_text_raises_only_spec_errors(text: str) -> None:
    accepted_or_spec_error(lambda: parse_trainer_config(text))


@FUZZ
@given(CONFIG_DATA)
def test_random_config_structures_raise_only_spec_errors(data: object) -> None:
    text = yaml.safe_dump(data)
    accepted_or_spec_error(lambda: parse_trainer_config(text))
    accepted_or_spec_error(lambda: parse_trainer_config(text.replace("'", "")))


@FUZZ
@given(st.dictionaries(ML_AGENTS_KEYS, CONFIG_DATA, max_size=4))
def test_random_behavior_settings_raise_only_spec_errors(settings_data: dict[str, Any]) -> None:
    text = yaml.safe_dump({"behaviors": {"A": settings_data}})
    accepted_or_spec_error(lambda: parse_trainer_config(text))


@FUZZ
@given(JSON_DATA)
def test_random_json_raises_only_spec_errors(data: object) -> None:
    accepted_or_spec_error(lambda: parse_job_spec(data))


@FUZZ
@given(
    st.fixed_dictionaries(
        {"config": st.just(with_behavior("{}")), "env": JSON_DATA},
        optional={
            "seed": JSON_DATA,
            "max_steps": JSON_DATA,
            "num_envs": JSON_DATA,
            "time_limit_s": JSON_DATA,
        },
    )
)
def test_random_spec_fields_raise_only_spec_errors(data: dict[str, Any]) -> None:
    accepted_or_spec_error(lambda: parse_job_spec(data))
