"""Our trainer configuration checks agree with ML-Agents 1.1.0's, except where we are stricter.

ML-Agents is imported only here: the domain must not depend on it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import attr
import pytest
import yaml
from mlagents.plugins.trainer_type import register_trainer_plugins
from mlagents.trainers.exception import TrainerConfigWarning
from mlagents.trainers.settings import RunOptions, TrainerSettings

from domain.errors import JobSpecError
from domain.spec import parse_job_spec, parse_trainer_config
from tests.domain.test_spec import VALID_CONFIGS

register_trainer_plugins()  # the PPO, SAC and POCA settings classes, as mlagents-learn does


@pytest.fixture(autouse=True)
def fresh_default_override() -> Iterator[None]:
    """RunOptions.from_dict keeps default_settings in a class variable; cases must not share it."""
    TrainerSettings.default_override = None
    yield
    TrainerSettings.default_override = None


def mlagents_run_options(data: object) -> Any:
    """What mlagents-learn makes of a loaded trainer configuration; raises if it refuses it."""
    TrainerSettings.default_override = None
    data = copy.deepcopy(data)  # from_dict changes the mapping it is given
    if not isinstance(data, dict):
        raise TypeError(f"top level is {type(data).__name__}")
    # mlagents-learn (RunOptions.from_argparse) refuses unknown top-level keys before from_dict.
    unknown = [key for key in data if key not in attr.fields_dict(RunOptions)]
    if unknown:
        raise KeyError(unknown)
    with warnings.catch_warnings():
        # A last lesson with completion_criteria only warns in ML-Agents.
        warnings.simplefilter("ignore", TrainerConfigWarning)
        return RunOptions.from_dict(data)


def mlagents_accepts(text: str) -> bool:
    try:
        mlagents_run_options(yaml.safe_load(text))  # what mlagents-learn's load_config does
    except Exception:
        return False
    return True


def ours_accepts(text: str) -> bool:
    try:
        parse_trainer_config(text)
    except JobSpecError:
        return False
    return True


def behavior(settings: str, extra: str = "") -> str:
    return f"behaviors:\n  A: {settings}\n{extra}"


def curriculum(first_lesson_extra: str, second: str = ", {name: b, value: 2}") -> str:
    return behavior(
        "{}",
        "environment_parameters:\n  p: {curriculum: [{name: a, value: 1"
        f"{first_lesson_extra}}}{second}]}}\n",
    )


def sampler(sampler_type: str, params: str) -> str:
    return behavior(
        "{}",
        f"environment_parameters:\n  p: {{sampler_type: {sampler_type}, "
        f"sampler_parameters: {params}}}\n",
    )


PPO = "trainer_type: ppo, "
CRITERIA = ", completion_criteria: {behavior: A}"

# Configurations both must accept (beyond VALID_CONFIGS), mostly ML-Agents' lenient corners.
BOTH_ACCEPT: dict[str, str] = {
    "empty behaviour": behavior("{}"),
    "learning_rate as text": behavior("{" + PPO + "hyperparameters: {learning_rate: 3e-4}}"),
    "batch_size as text": behavior("{" + PPO + "hyperparameters: {batch_size: '64'}}"),
    "max_steps as float text": behavior("{max_steps: 5.0e5}"),
    "max_steps as float": behavior("{max_steps: 5.0e+5}"),
    "integral float for an int": behavior("{time_horizon: 64.0}"),
    "sequence_length equal to batch_size": behavior(
        "{" + PPO + "hyperparameters: {batch_size: 64}, network_settings: "
        "{memory: {sequence_length: 64, memory_size: 2}}}"
    ),
    "memory null": behavior("{network_settings: {memory: null}}"),
    "memory defaults": behavior("{network_settings: {memory: {}}}"),
    "self_play null": behavior("{self_play: null, behavioral_cloning: null, init_path: null}"),
    "deprecated framework": behavior("{framework: tensorflow}"),
    "default_settings null": behavior("{}", "default_settings:\n"),
    "environment_parameters null": behavior("{}", "environment_parameters:\n"),
    "poca default under ppo behaviour": "default_settings: {trainer_type: poca}\n"
    + behavior("{trainer_type: ppo}"),
    "default hyperparameters without type": "default_settings: {trainer_type: sac}\n"
    + behavior("{hyperparameters: {tau: 0.01}}"),
    "last lesson with criteria (ML-Agents warns)": curriculum(CRITERIA, second=""),
    "progress threshold at 1": curriculum(
        ", completion_criteria: {behavior: A, measure: progress, threshold: 1}"
    ),
    "reward threshold above 1": curriculum(
        ", completion_criteria: {behavior: A, measure: reward, threshold: 7}"
    ),
    "sampler float text": sampler("constant", "{value: '1e3'}"),
    "uniform defaults": sampler("uniform", "{}"),
    "uniform equal bounds": sampler("uniform", "{min_value: 2, max_value: 2}"),
    "encoding_size on curiosity": behavior("{reward_signals: {curiosity: {encoding_size: 64}}}"),
    "engine settings": behavior("{}", "engine_settings: {width: 84, target_frame_rate: -1}\n"),
    "int constant parameter": behavior("{}", "environment_parameters:\n  p: 3\n"),
    "numeric behaviour name quoted": "behaviors:\n  '1': {}\n",
    "even checkpoints": behavior("{even_checkpoints: true, keep_checkpoints: 3}"),
}

# Configurations both must refuse: ML-Agents' own validation, which we reproduce.
BOTH_REJECT: dict[str, str] = {
    "top-level list": "- behaviors\n",
    "top-level scalar": "behaviors\n",
    "unknown top-level key": behavior("{}", "colour: red\n"),
    "unknown trainer setting": behavior("{learning_rate: 0.1}"),
    "unknown ppo hyperparameter": behavior("{" + PPO + "hyperparameters: {tau: 0.1}}"),
    "unknown sac hyperparameter": behavior("{trainer_type: sac, hyperparameters: {beta: 0.1}}"),
    "shared_critic on poca": behavior("{trainer_type: poca, hyperparameters: {shared_critic: 1}}"),
    "unknown reward signal key": behavior("{reward_signals: {extrinsic: {lr: 1}}}"),
    "encoding_size on extrinsic": behavior("{reward_signals: {extrinsic: {encoding_size: 3}}}"),
    "unknown reward signal": behavior("{reward_signals: {bonus: {}}}"),
    "unknown engine setting": behavior("{}", "engine_settings: {fps: 30}\n"),
    "unknown sampler parameter": sampler("uniform", "{low: 1}"),
    "unknown lesson key": curriculum(", weight: 3", second=""),
    "unknown key next to curriculum": behavior(
        "{}", "environment_parameters:\n  p: {curriculum: [{name: a, value: 1}], x: 1}\n"
    ),
    "bad trainer_type": behavior("{trainer_type: a2c}"),
    "bad vis_encode_type": behavior("{network_settings: {vis_encode_type: vgg}}"),
    "bad schedule": behavior("{" + PPO + "hyperparameters: {learning_rate_schedule: cosine}}"),
    "bad goal conditioning": behavior("{network_settings: {goal_conditioning_type: soft}}"),
    "bad measure": curriculum(", completion_criteria: {behavior: A, measure: steps}"),
    "bad sampler_type": sampler("beta", "{}"),
    "odd memory_size": behavior("{network_settings: {memory: {memory_size: 127}}}"),
    "zero memory_size": behavior("{network_settings: {memory: {memory_size: 0}}}"),
    "negative memory_size": behavior("{network_settings: {memory: {memory_size: -2}}}"),
    "sequence_length above batch_size": behavior(
        "{" + PPO + "hyperparameters: {batch_size: 32}, network_settings: "
        "{memory: {sequence_length: 64}}}"
    ),
    "sequence_length above default batch_size": behavior(
        "{trainer_type: sac, network_settings: {memory: {sequence_length: 256}}}"
    ),
    "sequence_length above batch_size from default_settings": (
        "default_settings: {trainer_type: ppo, hyperparameters: {batch_size: 64}}\n"
        + behavior("{network_settings: {memory: {sequence_length: 128}}}")
    ),
    "memory from default_settings, batch_size from behaviour": (
        "default_settings: {network_settings: {memory: {sequence_length: 128}}}\n"
        + behavior("{" + PPO + "hyperparameters: {batch_size: 64}}")
    ),
    "sequence_length above batch_size in default_settings": (
        "default_settings: {trainer_type: ppo, hyperparameters: {batch_size: 8}, "
        "network_settings: {memory: {}}}\n" + behavior("{}")
    ),
    "uniform min above max": sampler("uniform", "{min_value: 5, max_value: 1}"),
    "uniform min above default max": sampler("uniform", "{min_value: 5}"),
    "interval min above max": sampler("multirangeuniform", "{intervals: [[1, 2], [9, 3]]}"),
    "interval of one value": sampler("multirangeuniform", "{intervals: [[1]]}"),
    "missing completion_criteria": curriculum(""),
    "completion_criteria without behavior": curriculum(", completion_criteria: {threshold: 0}"),
    "progress threshold above 1": curriculum(
        ", completion_criteria: {behavior: A, measure: progress, threshold: 1.5}"
    ),
    "progress threshold below 0": curriculum(
        ", completion_criteria: {behavior: A, measure: progress, threshold: -0.1}"
    ),
    "lesson without name": behavior(
        "{}", "environment_parameters:\n  p: {curriculum: [{value: 1}]}\n"
    ),
    "lesson without value": behavior(
        "{}", "environment_parameters:\n  p: {curriculum: [{name: a}]}\n"
    ),
    "hyperparameters without trainer_type": behavior("{hyperparameters: {batch_size: 64}}"),
    "default hyperparameters without trainer_type": (
        "default_settings: {hyperparameters: {batch_size: 64}}\n" + behavior("{}")
    ),
    "ppo default_settings under a sac behaviour": (
        "default_settings: {trainer_type: ppo}\n" + behavior("{trainer_type: sac}")
    ),
    "implicit ppo default_settings under a poca behaviour": (
        "default_settings: {max_steps: 100}\n" + behavior("{trainer_type: poca}")
    ),
    "sac default_settings under a ppo behaviour": (
        "default_settings: {trainer_type: sac}\n" + behavior("{trainer_type: ppo}")
    ),
    "gail without demo_path": behavior("{reward_signals: {gail: {strength: 0.1}}}"),
    "behavioral_cloning without demo_path": behavior("{behavioral_cloning: {steps: 10}}"),
    "behaviour null": "behaviors:\n  A:\n",
    "behaviors null": "behaviors:\n",
    "network_settings null": behavior("{network_settings: null}"),
    "hyperparameters null": behavior("{" + PPO + "hyperparameters: null}"),
    "hyperparameters list": behavior("{" + PPO + "hyperparameters: [1]}"),
    "reward signal null": behavior("{reward_signals: {extrinsic: null}}"),
    "engine_settings null": behavior("{}", "engine_settings:\n"),
    "sampler without parameters": behavior(
        "{}", "environment_parameters:\n  p: {sampler_type: uniform}\n"
    ),
    "sampler parameters null": sampler("uniform", "null"),
    "parameter as text": behavior("{}", "environment_parameters:\n  p: '1.0'\n"),
    "parameter null": behavior("{}", "environment_parameters:\n  p:\n"),
    "max_steps not a number": behavior("{max_steps: lots}"),
    "batch_size in float notation": behavior("{" + PPO + "hyperparameters: {batch_size: 1e3}}"),
    "learning_rate not a number": behavior("{" + PPO + "hyperparameters: {learning_rate: fast}}"),
}

# Configurations ML-Agents accepts and we refuse on purpose; each entry says why.
STRICTER: dict[str, str] = {
    # ML-Agents silently ignores unknown keys in these nested sections; a typo there is lost.
    "unknown network setting": behavior("{network_settings: {units: 5}}"),
    "unknown memory setting": behavior("{network_settings: {memory: {size: 2}}}"),
    "unknown self_play setting": behavior("{self_play: {rounds: 3}}"),
    "unknown behavioral_cloning setting": behavior(
        "{behavioral_cloning: {demo_path: a.demo, epochs: 1}}"
    ),
    "unknown completion_criteria setting": curriculum(
        ", completion_criteria: {behavior: A, level: 2}"
    ),
    "unknown reward signal network setting": behavior(
        "{reward_signals: {extrinsic: {network_settings: {x: 1}}}}"
    ),
    "unknown key in a sampler": behavior(
        "{}",
        "environment_parameters:\n  p: {sampler_type: constant, "
        "sampler_parameters: {value: 1}, extra: 2}\n",
    ),
    # ML-Agents takes truthiness: the string "no" would switch normalization on.
    "boolean as text": behavior("{network_settings: {normalize: 'no'}}"),
    # ML-Agents turns true into 1 and truncates 10.7 to 10.
    "boolean as an integer": behavior("{" + PPO + "hyperparameters: {batch_size: true}}"),
    "fractional integer": behavior("{" + PPO + "hyperparameters: {batch_size: 10.7}}"),
    "fractional max_steps": behavior("{max_steps: 10.5}"),
    "boolean as a constant parameter": behavior("{}", "environment_parameters:\n  p: true\n"),
    # ML-Agents trains on NaN or infinite rates and returns garbage.
    "NaN learning rate": behavior("{" + PPO + "hyperparameters: {learning_rate: .nan}}"),
    "infinite gamma": behavior("{reward_signals: {extrinsic: {gamma: .inf}}}"),
    # ML-Agents str()s anything given for a name or a path; a number is surely a mistake.
    "numeric behaviour name": "behaviors:\n  1: {}\n",
    "numeric lesson name": behavior(
        "{}", "environment_parameters:\n  p: {curriculum: [{name: 5, value: 1}]}\n"
    ),
    # Behaviour names become file names on the train node; "?" separates ML-Agents' team id.
    "behaviour name with a slash": "behaviors:\n  a/b: {}\n",
    # A job must not read files elsewhere on the train node.
    "absolute init_path": behavior("{init_path: /etc/shadow}"),
    "demo_path out of the job": behavior(
        "{reward_signals: {gail: {demo_path: ../../other-job/expert.demo}}}"
    ),
    # ML-Agents starts with nothing to train, or with no reward, and fails later or learns nothing.
    "no behaviors": "engine_settings: {}\n",
    "empty behaviors": "behaviors: {}\n",
    "no reward signals": behavior("{reward_signals: {}}"),
    "empty curriculum": behavior("{}", "environment_parameters:\n  p: {curriculum: []}\n"),
    "empty intervals": sampler("multirangeuniform", "{intervals: []}"),
    "interval of three values": sampler("multirangeuniform", "{intervals: [[1, 2, 3]]}"),
    "negative st_dev": sampler("gaussian", "{st_dev: -1}"),
    # ML-Agents fails mid-run when a lesson's behaviour is not trained.
    "completion criteria for an unknown behaviour": curriculum(
        ", completion_criteria: {behavior: Typo}"
    ),
    # With batch_size above buffer_size no update ever runs.
    "batch_size above buffer_size": behavior(
        "{" + PPO + "hyperparameters: {batch_size: 4096, buffer_size: 1024}}"
    ),
    # Ranges: zero, negative and absurd values.
    "negative time_horizon": behavior("{time_horizon: -5}"),
    "zero keep_checkpoints": behavior("{keep_checkpoints: 0}"),
    "huge hidden_units": behavior("{network_settings: {hidden_units: 100000}}"),
    "zero learning rate": behavior("{" + PPO + "hyperparameters: {learning_rate: 0}}"),
    "gamma above 1": behavior("{reward_signals: {extrinsic: {gamma: 1.5}}}"),
    "huge max_steps": behavior("{max_steps: 1.0e+12}"),
    "huge buffer": behavior("{" + PPO + "hyperparameters: {buffer_size: 1000000000}}"),
    "time_scale above Unity's cap": behavior("{}", "engine_settings: {time_scale: 1000}\n"),
    # Trainyard sets these itself.
    "env_settings": behavior("{}", "env_settings: {seed: 3}\n"),
    "checkpoint_settings": behavior("{}", "checkpoint_settings: {run_id: x}\n"),
    "torch_settings": behavior("{}", "torch_settings: {device: cpu}\n"),
    "debug": behavior("{}", "debug: true\n"),
    # PyYAML keeps the last of duplicate keys; the first value would be silently lost.
    "duplicate keys": behavior("{max_steps: 1, max_steps: 2}"),
    # A date where a path belongs is a mistake (ML-Agents would str() it).
    "timestamp": behavior("{init_path: 2020-01-01}"),
}


def test_corpora_do_not_overlap() -> None:
    cases = [*VALID_CONFIGS.values(), *BOTH_ACCEPT.values(), *BOTH_REJECT.values()]
    assert len(set(cases + list(STRICTER.values()))) == len(cases) + len(STRICTER)


@pytest.mark.parametrize(
    "text", [*VALID_CONFIGS.values(), *BOTH_ACCEPT.values()], ids=[*VALID_CONFIGS, *BOTH_ACCEPT]
)
def test_both_accept(text: str) -> None:
    assert mlagents_accepts(text)
    assert ours_accepts(text)


@pytest.mark.parametrize("text", BOTH_REJECT.values(), ids=BOTH_REJECT)
def test_both_reject(text: str) -> None:
    assert not mlagents_accepts(text)
    assert not ours_accepts(text)


@pytest.mark.parametrize("text", STRICTER.values(), ids=STRICTER)
def test_we_are_stricter(text: str) -> None:
    assert mlagents_accepts(text), "ML-Agents refuses this too: move it to BOTH_REJECT"
    assert not ours_accepts(text)


def as_settings(data: object) -> dict[str, Any]:
    """ML-Agents' full reading of a configuration, with every default filled in."""
    options: dict[str, Any] = mlagents_run_options(data).as_dict()
    return options


@pytest.mark.parametrize("max_steps", [None, 4321])
@pytest.mark.parametrize(
    "text", [*VALID_CONFIGS.values(), *BOTH_ACCEPT.values()], ids=[*VALID_CONFIGS, *BOTH_ACCEPT]
)
def test_mlagents_reads_our_config_as_it_reads_the_raw_yaml(
    text: str, max_steps: int | None
) -> None:
    spec = parse_job_spec({"config": text, "env": {"builtin": "x"}, "max_steps": max_steps})

    ours = as_settings(spec.trainer_config())
    raw = as_settings(yaml.safe_load(text))

    if max_steps is not None:
        for settings in raw["behaviors"].values():
            assert settings["max_steps"] != max_steps  # the override is really a change
            settings["max_steps"] = max_steps
            if settings["even_checkpoints"]:
                settings["checkpoint_interval"] = max_steps // settings["keep_checkpoints"]
    assert ours == raw
    assert list(ours["behaviors"]) == spec.behavior_names


def test_shared_anchors_do_not_leak_between_behaviors() -> None:
    # ML-Agents adds beta_schedule and epsilon_schedule to a PPO behaviour's hyperparameters mapping
    # in place; given the raw YAML, that leaks through the shared anchor into the SAC behaviour,
    # which then refuses them. Our trainer_config() holds separate copies, so it trains.
    text = (
        "behaviors:\n"
        "  A: {trainer_type: ppo, hyperparameters: &hp {batch_size: 64, "
        "learning_rate_schedule: constant}}\n"
        "  B: {trainer_type: sac, hyperparameters: *hp}\n"
    )
    spec = parse_job_spec({"config": text, "env": {"builtin": "x"}})

    assert not mlagents_accepts(text)
    assert (
        as_settings(spec.trainer_config())["behaviors"]["B"]["hyperparameters"]["batch_size"] == 64
    )
