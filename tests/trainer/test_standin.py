"""Stand-in builds against the real ML-Agents: wire format, dynamics, and whole training runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from mlagents_envs.base_env import ActionTuple
from mlagents_envs.communicator_objects.agent_info_pb2 import AgentInfoProto
from mlagents_envs.communicator_objects.brain_parameters_pb2 import BrainParametersProto
from mlagents_envs.communicator_objects.unity_message_pb2 import UnityMessageProto
from mlagents_envs.communicator_objects.unity_rl_initialization_output_pb2 import (
    UnityRLInitializationOutputProto,
)
from mlagents_envs.environment import UnityEnvironment
from mlagents_envs.side_channel.engine_configuration_channel import EngineConfigurationChannel
from mlagents_envs.side_channel.environment_parameters_channel import (
    EnvironmentParametersChannel,
)
from mlagents_envs.side_channel.side_channel_manager import SideChannelManager
from mlagents_envs.side_channel.stats_side_channel import StatsSideChannel

from tests.trainer.conftest import PROJECT_ROOT, Trainers, free_base_port, ppo_config
from trainer.standin import BUILTIN_NAMES, builtin_build, wire
from trainer.standin.channels import SideChannels
from trainer.standin.envs import ENVIRONMENTS, GridGoal, Reach

# ---------------------------------------------------------------- wire format and dynamics


def test_hand_encoded_output_parses_like_the_generated_classes():
    encoder = wire.AgentInfoEncoder(obs_size=3)
    infos = [
        encoder.encode(7, -0.25, [0.5, -1.0, 2.0]),
        encoder.encode(300, 1.0, [0.0, 0.0, 1.0], done=True, max_step_reached=True),
    ]
    brain = BrainParametersProto(brain_name="B?team=0", is_training=True)
    brain.action_spec.num_continuous_actions = 2
    init_output = UnityRLInitializationOutputProto(brain_parameters=[brain]).SerializeToString()
    side = wire.stat_record("Env/X", 1.5)

    parsed = UnityMessageProto.FromString(
        wire.unity_output_message(b"B?team=0", infos, side, init_output)
    )

    expected = UnityMessageProto()
    expected.header.status = 200
    rl_output = expected.unity_output.rl_output
    for agent_id, reward, obs, done in [
        (7, -0.25, [0.5, -1.0, 2.0], False),
        (300, 1.0, [0, 0, 1], True),
    ]:
        info = AgentInfoProto(id=agent_id, reward=reward, done=done, max_step_reached=done)
        observation = info.observations.add()
        observation.shape.append(3)
        observation.dimension_properties.append(1)
        observation.float_data.data.extend(obs)
        rl_output.agentInfos["B?team=0"].value.append(info)
    rl_output.side_channel = side
    expected.unity_output.rl_initialization_output.brain_parameters.append(brain)
    assert parsed == expected


def test_stat_records_reach_mlagents_stats_channel():
    stats = StatsSideChannel()
    data = wire.stat_record("Env/Success rate", 0.75) + wire.stat_record("Env/Success rate", 1)
    SideChannelManager([stats]).process_side_channel_message(data)
    values = [value for value, _ in stats.get_and_reset_stats()["Env/Success rate"]]
    assert values == [0.75, 1.0]


def test_trainer_side_channels_are_understood():
    engine = EngineConfigurationChannel()
    engine.set_configuration_parameters(width=84, height=84, time_scale=20.0)
    params = EnvironmentParametersChannel()
    params.set_float_parameter("grid_size", 3.0)
    params.set_uniform_sampler_parameters("goal_range", 0.2, 0.4, seed=5)
    params.set_multirangeuniform_sampler_parameters("other", [(1.0, 2.0), (5.0, 6.0)], seed=1)
    data = SideChannelManager([engine, params]).generate_side_channel_messages()
    # An unknown channel and a truncated record are logged, not fatal.
    data += wire.side_channel_record(wire.TRAINING_ANALYTICS_CHANNEL, b"\x01\x02") + b"\x00" * 7

    sides = SideChannels()
    sides.receive(bytes(data))

    assert sides.engine["screen_resolution"] == (84, 84)
    assert sides.engine["time_scale"] == (20.0,)
    assert sides.parameters.get("grid_size", 5.0) == 3.0
    draws = [sides.parameters.get("goal_range", 1.0) for _ in range(20)]
    assert all(0.2 <= d <= 0.4 for d in draws)
    assert len(set(draws)) > 1
    assert all(
        1 <= v <= 2 or 5 <= v <= 6 for v in (sides.parameters.get("other", 0) for _ in range(20))
    )
    assert sides.parameters.get("unset", 4.5) == 4.5


def rollout(env_type, seed: int, steps: int = 200):
    env = env_type(4, seed)
    trace = [env.reset()]
    rng = np.random.default_rng(0)  # the same actions for every env instance
    for _ in range(steps):
        continuous = rng.uniform(-1, 1, (4, max(env.continuous_size, 1))).tolist()
        discrete = rng.integers(0, 5, (4, 1)).tolist()
        trace.append(env.step(continuous, discrete))
    return trace


@pytest.mark.parametrize("env_type", [Reach, GridGoal])
def test_dynamics_are_deterministic_for_a_seed(env_type):
    assert rollout(env_type, seed=11) == rollout(env_type, seed=11)
    assert rollout(env_type, seed=11) != rollout(env_type, seed=12)


@pytest.mark.parametrize("env_type", [Reach, GridGoal])
def test_every_episode_ends_and_reports_its_stat(env_type):
    trace = rollout(env_type, seed=3, steps=env_type.max_episode_steps * 3)
    ended = [t for transitions, _ in trace[1:] for t in transitions if t.done]
    stats = [s for _, stats in trace[1:] for s in stats]
    assert len(ended) >= 4 * 3  # every agent finished at least three episodes
    assert len(stats) == len(ended)
    if env_type is Reach:
        assert all(t.max_step_reached for t in ended)
    # A new episode gets a fresh id, as a Unity agent's episode does.
    ids = [t.agent_id for t in ended]
    assert len(set(ids)) == len(ids)


def test_builtin_build_is_an_executable_for_each_name(tmp_path):
    assert set(BUILTIN_NAMES) == set(ENVIRONMENTS) >= {"reach", "gridgoal"}
    for name in BUILTIN_NAMES:
        path = builtin_build(name, tmp_path)
        assert path == tmp_path.resolve() / name
        assert os.access(path, os.X_OK)
        assert path.read_text().startswith(f"#!{sys.executable}\n")
        assert builtin_build(name, tmp_path) == path  # idempotent
    with pytest.raises(KeyError, match="unknown built-in build"):
        builtin_build("nope", tmp_path)
    # mlagents-learn strips ".app"/".exe"/".x86" from --env, wherever they are in the path.
    with pytest.raises(ValueError, match="cannot launch"):
        builtin_build("reach", tmp_path / "my.apps")


# ---------------------------------------------------------------- the build as a process


@pytest.mark.slow
def test_build_rejects_bad_command_lines():
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trainer.standin", *args],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert run("nope").returncode == 2
    bad_fault = run("reach", "--fault", "explode")
    assert bad_fault.returncode == 2
    assert "unknown fault" in bad_fault.stderr


@pytest.mark.slow
def test_unity_environment_drives_the_build(trainers: Trainers, tmp_path: Path):
    """mlagents_envs' own client: Unity flags, areas, side channels, episodes, stats, close."""
    stats, params, engine = (
        StatsSideChannel(),
        EnvironmentParametersChannel(),
        EngineConfigurationChannel(),
    )
    engine.set_configuration_parameters(time_scale=20.0)
    params.set_float_parameter("grid_size", 3.0)
    log_file = tmp_path / "player.log"
    env = UnityEnvironment(
        str(builtin_build("gridgoal", tmp_path / "builds")),
        base_port=free_base_port(),
        seed=4,
        num_areas=2,  # agents per area x areas
        no_graphics=True,
        timeout_wait=30,
        additional_args=[
            "-screen-width",
            "80",
            "-force-vulkan",
            "--agents",
            "3",
            "-logFile",
            str(log_file),
        ],
        side_channels=[stats, params, engine],
    )
    try:
        env.reset()
        (behavior,) = env.behavior_specs
        assert behavior == "GridGoal?team=0"
        assert env.behavior_specs[behavior].action_spec.discrete_branches == (5,)
        decisions, _ = env.get_steps(behavior)
        assert len(decisions) == 6
        # grid_size 3 puts every coordinate on -1, 0 or 1.
        assert set(np.unique(decisions.obs[0])) <= {-1.0, 0.0, 1.0}
        rewards = []
        for _ in range(40):
            decisions, _ = env.get_steps(behavior)
            obs = decisions.obs[0]
            # Step toward the goal: x first, then y (actions: stay, up, down, left, right).
            action = np.where(
                obs[:, 2] > obs[:, 0],
                4,
                np.where(obs[:, 2] < obs[:, 0], 3, np.where(obs[:, 3] > obs[:, 1], 1, 2)),
            )
            env.set_actions(behavior, ActionTuple(discrete=action.reshape(-1, 1).astype(np.int32)))
            env.step()
            rewards.extend(env.get_steps(behavior)[1].reward)
        assert rewards
        assert min(rewards) > 0.9  # every episode ended at the goal
        success = [value for value, _ in stats.get_and_reset_stats()["Env/Success rate"]]
        assert len(success) == len(rewards)
        assert set(success) == {1.0}
    finally:
        env.close()
    log = log_file.read_text()
    assert "ignoring unknown arguments ['-screen-width', '80', '-force-vulkan']" in log
    assert "environment parameter grid_size = 3.0" in log


# ---------------------------------------------------------------- training with mlagents-learn

LEARNING = {
    # build: (behavior, max_steps, extra hyperparameters, final mean reward above, rise above)
    "reach": ("Reach", 6000, {"beta": 1.0e-3}, -0.5, 0.4),
    "gridgoal": ("GridGoal", 5000, {"beta": 1.0e-2}, 0.8, 0.4),
}


@pytest.mark.slow
@pytest.mark.parametrize("build", sorted(LEARNING))
def test_ppo_learns_the_build(trainers: Trainers, build: str):
    behavior, max_steps, hyper, final_above, rise_above = LEARNING[build]
    run = trainers.start(build, ppo_config(behavior, max_steps, hyper=hyper), seed=1)
    assert run.wait(timeout=280) == 0, run.output()[-3000:]
    # A finished run leaves nothing behind by itself: its build exited on the trainer's close.
    assert trainers.leftovers() == []

    model = run.results / f"{behavior}.onnx"
    onnx.checker.check_model(onnx.load(str(model)))

    # The effective configuration, as the trainer resolved it, comes first.
    first_record = run.records()[0]
    assert first_record["property"] == "hyperparameters"
    assert first_record["value"]["hyperparameters"]["learning_rate"] == 1.0e-2
    assert first_record["value"]["network_settings"]["hidden_units"] == 32

    curve = run.reward_curve(behavior)
    assert [step for step, _ in curve] == list(range(1000, max_steps + 1, 1000))
    first, last = curve[0][1], curve[-1][1]
    assert last > final_above, curve
    assert last - first > rise_above, curve

    # The build's own stat, sent through the stats side channel, is in every summary.
    stat_key = ENVIRONMENTS[build].stat_key
    summaries = run.summaries(behavior)
    assert all(s["stats"][stat_key]["count"] > 0 for s in summaries)
    stat = [s["stats"][stat_key]["mean"] for s in summaries]
    assert (stat[-1] < stat[0]) if build == "reach" else (stat[-1] > stat[0])
    assert (
        "trainer closed the connection" in run.player_log() or "exchange ended" in run.player_log()
    )


@pytest.mark.slow
def test_same_seed_gives_the_same_reward_curve(trainers: Trainers):
    config = ppo_config("Reach", 1500, summary_freq=500)
    # Started together: each has its own ports, directories and process group.
    runs = [trainers.start("reach", config, seed=5, run_id=f"same{i}") for i in range(2)]
    other = trainers.start("reach", config, seed=6, run_id="other")
    for run in [*runs, other]:
        assert run.wait(timeout=200) == 0, run.output()[-3000:]
    curves = [run.reward_curve("Reach") for run in runs]
    assert len(curves[0]) == 3
    assert curves[0] == curves[1]
    assert other.reward_curve("Reach") != curves[0]
    goal_distance = [[s["stats"]["Env/Goal distance"] for s in r.summaries("Reach")] for r in runs]
    assert goal_distance[0] == goal_distance[1]


@pytest.mark.slow
def test_crashing_build_fails_the_run(trainers: Trainers):
    run = trainers.start(
        "reach",
        ppo_config("Reach", 5000),
        # The trainer checks on the build every timeout_wait/10 s.
        "--timeout-wait=10",
        env_args=("--fault", "crash-after", "20"),
    )
    rc = run.wait(timeout=150)
    assert rc != 0
    # ML-Agents restarts the crashed build once, then gives up (one restart per minute).
    assert run.player_log().count("fault: crashing after 20 steps") == 2
    assert "Environment shut down with return code 3" in run.output()


@pytest.mark.slow
def test_build_that_never_connects_times_out(trainers: Trainers):
    run = trainers.start(
        "reach",
        ppo_config("Reach", 5000),
        "--timeout-wait=3",
        env_args=("--fault", "never-connect"),
    )
    assert run.wait(timeout=120) == 1
    assert "UnityTimeOutException" in run.output()
    assert "never connecting" in run.player_log()


@pytest.mark.slow
def test_hanging_build_does_not_end_the_run(trainers: Trainers):
    """Why a train node needs its own watchdog: nothing ends this run for a long time."""
    run = trainers.start(
        "reach", ppo_config("Reach", 5000), env_args=("--fault", "hang-after", "20")
    )
    deadline = time.monotonic() + 120
    while "stopped answering" not in run.player_log():
        assert run.proc.poll() is None, run.output()[-3000:]
        assert time.monotonic() < deadline, "the build never reached its hang"
        time.sleep(0.2)
    with pytest.raises(subprocess.TimeoutExpired):
        run.wait(timeout=8)
    # The build is alive too, in a session of its own that killing the trainer's group misses.
    (build,) = [
        p
        for p in psutil.Process(run.proc.pid).children(recursive=True)
        if "--mlagents-port" in p.cmdline()
    ]
    assert os.getsid(build.pid) != os.getsid(run.proc.pid)
    # The trainers fixture kills both and checks that nothing is left.
