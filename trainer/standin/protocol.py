"""The Unity player's side of ML-Agents' gRPC protocol: the player is the client of the trainer's
`UnityToExternalProto/Exchange`, one call per step (see shared/notes/mlagents.md)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from mlagents_envs.communicator_objects.brain_parameters_pb2 import (
    ActionSpecProto,
    BrainParametersProto,
)
from mlagents_envs.communicator_objects.capabilities_pb2 import UnityRLCapabilitiesProto
from mlagents_envs.communicator_objects.command_pb2 import QUIT, RESET, STEP
from mlagents_envs.communicator_objects.unity_message_pb2 import UnityMessageProto
from mlagents_envs.communicator_objects.unity_rl_initialization_output_pb2 import (
    UnityRLInitializationOutputProto,
)

from trainer.standin import wire
from trainer.standin.channels import SideChannels
from trainer.standin.envs import StandinEnv, Transition

log = logging.getLogger(__name__)

EXCHANGE = "/communicator_objects.UnityToExternalProto/Exchange"
COMMUNICATION_VERSION = "1.5.0"
# The Unity package (com.unity.ml-agents) release that pairs with mlagents 1.1.0.
PACKAGE_VERSION = "3.0.0"
CRASH_EXIT_CODE = 3
# The trainer's server is up before it launches the player; this only bounds a wrong port.
CONNECT_TIMEOUT_S = 30.0
# Log a progress line every this many steps.
LOG_EVERY = 2000

Exchange = Callable[..., Any]


@dataclass(frozen=True)
class Fault:
    """A failure to inject: `kind` is never-connect, crash-after or hang-after; `after` in steps."""

    kind: str
    after: int = 0


def hang_forever(reason: str) -> NoReturn:
    """Stay alive without ever talking to the trainer again (until a signal ends the process)."""
    log.warning("fault: %s; hanging", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    while True:
        threading.Event().wait(3600)


def _capabilities() -> UnityRLCapabilitiesProto:
    # What a current Unity player announces.
    return UnityRLCapabilitiesProto(
        baseRLCapabilities=True,
        concatenatedPngObservations=True,
        compressedChannelMapping=True,
        hybridActions=True,
        trainingAnalytics=True,
        variableLengthObservation=True,
        multiAgentGroups=True,
    )


def _brain_parameters(env_type: type[StandinEnv], behavior_name: str) -> bytes:
    branches = list(env_type.discrete_branches)
    continuous = env_type.continuous_size
    brain = BrainParametersProto(
        brain_name=behavior_name,
        is_training=True,
        action_spec=ActionSpecProto(
            num_continuous_actions=continuous,
            num_discrete_actions=len(branches),
            discrete_branch_sizes=branches,
        ),
        # Unity still fills the pre-1.3 fields; 1 = continuous, 0 = discrete.
        vector_action_size_deprecated=[continuous] if continuous else branches,
        vector_action_space_type_deprecated=1 if continuous else 0,
    )
    output = UnityRLInitializationOutputProto(brain_parameters=[brain])
    return bytes(output.SerializeToString())


class Player:
    """Runs one environment against the trainer until it closes the connection."""

    def __init__(
        self, env_type: type[StandinEnv], agents_per_area: int, fault: Fault | None = None
    ) -> None:
        self.env_type = env_type
        self.agents_per_area = agents_per_area
        self.fault = fault
        self.behavior_name = f"{env_type.behavior}?team=0"
        self.behavior_key = self.behavior_name.encode()
        self.encoder = wire.AgentInfoEncoder(env_type.obs_size)
        self.sides = SideChannels()
        self.env: StandinEnv | None = None
        self.steps = 0
        self._brain_sent = False
        self._started = False

    def run(self, port: int) -> int:
        """Connect to the trainer on `port` and play; returns the process exit code."""
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            exchange = channel.unary_unary(
                EXCHANGE,
                request_serializer=None,  # requests are already serialized bytes
                response_deserializer=UnityMessageProto.FromString,
            )
            try:
                return self._play(exchange)
            except grpc.RpcError as error:
                # The trainer is gone. Its close() sends the status-400 reply and stops its server
                # at once, so the reply often loses that race: a normal way for a run to end.
                log.info(
                    "exchange ended after %d steps (%.1f s CPU): %s",
                    self.steps,
                    time.process_time(),
                    error.code() if isinstance(error, grpc.Call) else error,
                )
                return 0

    def _handshake(self, exchange: Exchange) -> None:
        init = UnityMessageProto()
        init.header.status = wire.STATUS_OK
        out = init.unity_output.rl_initialization_output
        out.name = f"Trainyard stand-in {self.env_type.behavior}"
        out.communication_version = COMMUNICATION_VERSION
        out.package_version = PACKAGE_VERSION
        out.capabilities.CopyFrom(_capabilities())
        reply = exchange(init.SerializeToString(), wait_for_ready=True, timeout=CONNECT_TIMEOUT_S)
        params = reply.unity_input.rl_initialization_input
        log.info(
            "connected: trainer communication %s, package %s, seed %d, areas %d",
            params.communication_version,
            params.package_version,
            params.seed,
            params.num_areas,
        )
        n_agents = self.agents_per_area * max(1, params.num_areas)
        self.env = self.env_type(n_agents, params.seed, self.sides.parameters.get)

    def _play(self, exchange: Exchange) -> int:
        try:
            self._handshake(exchange)
        except grpc.RpcError as error:
            log.error("could not reach the trainer: %s", error)
            return 1
        # With K = 0 the fault strikes between the two handshake messages, where mlagents-learn
        # waits without a timeout.
        self._check_fault()
        # Second handshake message: empty; the reply is the trainer's first command.
        reply = exchange(wire.header_only_message())
        while True:
            if reply.header.status == wire.STATUS_CLOSE:
                log.info(
                    "trainer closed the connection after %d steps (%.1f s CPU)",
                    self.steps,
                    time.process_time(),
                )
                return 0
            self._check_fault()
            rl_input = reply.unity_input.rl_input
            self.sides.receive(rl_input.side_channel)
            if rl_input.command == QUIT:
                log.info("quit after %d steps", self.steps)
                return 0
            reply = exchange(self._answer(rl_input))

    def _answer(self, rl_input: Any) -> bytes:
        env = self.env
        assert env is not None
        stats: list[float] = []
        # Like an Academy, the first step of a run starts the episodes.
        if rl_input.command == RESET or not self._started:
            self._started = True
            transitions = env.reset()
            log.info("reset: %d agents", env.n_agents)
        elif rl_input.command == STEP:
            continuous, discrete = self._actions(rl_input, env.n_agents)
            transitions, stats = env.step(continuous, discrete)
            self.steps += 1
            if self.steps % LOG_EVERY == 0:
                log.info("step %d, %d episodes done", self.steps, env.episodes_done)
        else:
            raise ValueError(f"unknown command {rl_input.command}")
        return self._output(transitions, stats)

    def _actions(self, rl_input: Any, n_agents: int) -> tuple[list[list[float]], list[list[int]]]:
        n_cont = self.env_type.continuous_size
        n_disc = len(self.env_type.discrete_branches)
        continuous = [[0.0] * n_cont for _ in range(n_agents)]
        discrete = [[0] * n_disc for _ in range(n_agents)]
        # Reading a missing key of a protobuf map would insert it; test membership first.
        if self.behavior_name in rl_input.agent_actions:
            actions = rl_input.agent_actions[self.behavior_name].value
            # One action per agent that asked for a decision, in the order they were sent.
            for i, action in enumerate(actions[:n_agents]):
                if n_cont:
                    continuous[i] = list(action.continuous_actions) or list(
                        action.vector_actions_deprecated[:n_cont]
                    )
                if n_disc:
                    discrete[i] = list(action.discrete_actions) or [
                        int(v) for v in action.vector_actions_deprecated[:n_disc]
                    ]
        return continuous, discrete

    def _output(self, transitions: Sequence[Transition], stats: Sequence[float]) -> bytes:
        encode = self.encoder.encode
        infos = [
            encode(t.agent_id, t.reward, t.obs, t.done, t.max_step_reached) for t in transitions
        ]
        side_channel = b"".join(wire.stat_record(self.env_type.stat_key, s) for s in stats)
        brain = b""
        if not self._brain_sent:
            # The trainer registers a behaviour only if its BrainParameters arrive together with
            # its first agent infos.
            brain = _brain_parameters(self.env_type, self.behavior_name)
            self._brain_sent = True
        return wire.unity_output_message(self.behavior_key, infos, side_channel, brain)

    def _check_fault(self) -> None:
        """Inject the fault once `after` STEP commands have been answered."""
        fault = self.fault
        if fault is None or self.steps < fault.after:
            return
        if fault.kind == "crash-after":
            log.error("fault: crashing after %d steps", self.steps)
            logging.shutdown()
            # Like a player that crashes: no clean-up, no goodbye to the trainer.
            os._exit(CRASH_EXIT_CODE)
        if fault.kind == "hang-after":
            hang_forever(f"stopped answering after {self.steps} steps")
