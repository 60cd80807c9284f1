"""Dynamics of the stand-in environments: pure Python, deterministic for a given seed."""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

# Reads a parameter the trainer sent (key, default); see channels.EnvironmentParameters.get.
ParameterSource = Callable[[str, float], float]


def _defaults(key: str, default: float) -> float:
    return default


class Transition(NamedTuple):
    """What one agent reports for one step: an `AgentInfoProto`'s content."""

    agent_id: int
    reward: float
    obs: list[float]
    done: bool
    max_step_reached: bool


class StandinEnv(ABC):
    """Several agents of one behaviour, stepped together like agents of one Unity scene.

    An agent whose episode ends reports a terminal transition and, in the same step, the first
    transition of its next episode under a new id, as a Unity agent does.
    """

    behavior: ClassVar[str]
    obs_size: ClassVar[int]
    continuous_size: ClassVar[int] = 0
    discrete_branches: ClassVar[tuple[int, ...]] = ()
    max_episode_steps: ClassVar[int]
    # The key of the custom stat reported at each episode end through the stats side channel.
    stat_key: ClassVar[str]

    def __init__(self, n_agents: int, seed: int, parameters: ParameterSource = _defaults) -> None:
        self.n_agents = n_agents
        self.rng = random.Random(seed)  # noqa: S311 -- a simulation, not cryptography
        self.parameters = parameters
        self.episode_steps = [0] * n_agents
        self.ids = [0] * n_agents
        self.next_id = 1
        self.episodes_done = 0

    @abstractmethod
    def begin_episode(self, i: int) -> None:
        """Place agent `i` at the start of a new episode."""

    @abstractmethod
    def observe(self, i: int) -> list[float]:
        """Agent `i`'s vector observation."""

    @abstractmethod
    def act(
        self, i: int, continuous: Sequence[float], discrete: Sequence[int]
    ) -> tuple[float, bool]:
        """Apply agent `i`'s action; returns its reward and whether it reached a terminal state."""

    @abstractmethod
    def episode_stat(self, i: int) -> float:
        """The custom stat of agent `i`'s episode that just ended."""

    def _start(self, i: int) -> Transition:
        self.ids[i] = self.next_id
        self.next_id += 1
        self.episode_steps[i] = 0
        self.begin_episode(i)
        return Transition(self.ids[i], 0.0, self.observe(i), False, False)

    def reset(self) -> list[Transition]:
        """Start a new episode for every agent (the RESET command)."""
        return [self._start(i) for i in range(self.n_agents)]

    def step(
        self, continuous: Sequence[Sequence[float]], discrete: Sequence[Sequence[int]]
    ) -> tuple[list[Transition], list[float]]:
        """Apply one action per agent (the STEP command).

        Returns the transitions in the order to send them (an agent that asks for a decision
        must be answered in this order) and the custom stat of each episode that ended.
        """
        out: list[Transition] = []
        stats: list[float] = []
        for i in range(self.n_agents):
            self.episode_steps[i] += 1
            reward, terminal = self.act(i, continuous[i], discrete[i])
            timed_out = not terminal and self.episode_steps[i] >= self.max_episode_steps
            if terminal or timed_out:
                out.append(Transition(self.ids[i], reward, self.observe(i), True, timed_out))
                stats.append(self.episode_stat(i))
                self.episodes_done += 1
                out.append(self._start(i))
            else:
                out.append(Transition(self.ids[i], reward, self.observe(i), False, False))
        return out, stats


class Reach(StandinEnv):
    """Continuous 2-D move-to-goal: each step costs the distance still to go."""

    behavior = "Reach"
    obs_size = 4
    continuous_size = 2
    max_episode_steps = 20
    stat_key = "Env/Goal distance"
    speed = 0.2

    def __init__(self, n_agents: int, seed: int, parameters: ParameterSource = _defaults) -> None:
        super().__init__(n_agents, seed, parameters)
        self.pos = [[0.0, 0.0] for _ in range(n_agents)]
        self.goal = [[0.0, 0.0] for _ in range(n_agents)]

    def begin_episode(self, i: int) -> None:
        """Random start and goal; the parameter `goal_range` shrinks the goal area."""
        goal_range = min(max(self.parameters("goal_range", 1.0), 0.0), 1.0)
        uniform = self.rng.uniform
        self.pos[i] = [uniform(-1.0, 1.0), uniform(-1.0, 1.0)]
        self.goal[i] = [uniform(-goal_range, goal_range), uniform(-goal_range, goal_range)]

    def observe(self, i: int) -> list[float]:
        """Own position, then goal position."""
        return self.pos[i] + self.goal[i]

    def _distance(self, i: int) -> float:
        (x, y), (gx, gy) = self.pos[i], self.goal[i]
        return math.hypot(gx - x, gy - y)

    def act(
        self, i: int, continuous: Sequence[float], discrete: Sequence[int]
    ) -> tuple[float, bool]:
        """Move up to `speed` per axis; the rewards sum to minus the mean distance to the goal."""
        pos = self.pos[i]
        for axis in (0, 1):
            move = min(max(float(continuous[axis]), -1.0), 1.0) * self.speed
            pos[axis] = min(max(pos[axis] + move, -1.0), 1.0)
        return -self._distance(i) / self.max_episode_steps, False

    def episode_stat(self, i: int) -> float:
        """Distance to the goal at the end of the episode."""
        return self._distance(i)


class GridGoal(StandinEnv):
    """Discrete grid world: stay/up/down/left/right until the goal cell; +1 there, -0.01 a step."""

    behavior = "GridGoal"
    obs_size = 4
    discrete_branches = (5,)
    max_episode_steps = 20
    stat_key = "Env/Success rate"
    _moves = ((0, 0), (0, 1), (0, -1), (-1, 0), (1, 0))

    def __init__(self, n_agents: int, seed: int, parameters: ParameterSource = _defaults) -> None:
        super().__init__(n_agents, seed, parameters)
        self.sizes = [5] * n_agents
        self.cell = [(0, 0)] * n_agents
        self.goal = [(0, 0)] * n_agents
        self.reached = [False] * n_agents

    def begin_episode(self, i: int) -> None:
        """Random distinct start and goal cells; the parameter `grid_size` (2-9) sets the grid."""
        size = self.sizes[i] = int(min(max(self.parameters("grid_size", 5.0), 2.0), 9.0))
        start = self.rng.randrange(size * size)
        goal = (start + 1 + self.rng.randrange(size * size - 1)) % (size * size)  # not the start
        self.cell[i] = divmod(start, size)
        self.goal[i] = divmod(goal, size)
        self.reached[i] = False

    def observe(self, i: int) -> list[float]:
        """Own cell, then goal cell, each coordinate scaled to [-1, 1]."""
        scale = 2.0 / (self.sizes[i] - 1)
        (x, y), (gx, gy) = self.cell[i], self.goal[i]
        return [x * scale - 1.0, y * scale - 1.0, gx * scale - 1.0, gy * scale - 1.0]

    def act(
        self, i: int, continuous: Sequence[float], discrete: Sequence[int]
    ) -> tuple[float, bool]:
        """Move one cell (walls stop the agent); reaching the goal ends the episode."""
        dx, dy = self._moves[int(discrete[0]) % len(self._moves)]
        x, y = self.cell[i]
        last = self.sizes[i] - 1
        self.cell[i] = (min(max(x + dx, 0), last), min(max(y + dy, 0), last))
        if self.cell[i] == self.goal[i]:
            self.reached[i] = True
            return 1.0 - 0.01, True
        return -0.01, False

    def episode_stat(self, i: int) -> float:
        """1 if the agent reached the goal, else 0."""
        return 1.0 if self.reached[i] else 0.0


ENVIRONMENTS: dict[str, type[StandinEnv]] = {"reach": Reach, "gridgoal": GridGoal}
