"""The side channels a Unity player receives from the trainer: environment parameters, engine
configuration and training analytics."""

from __future__ import annotations

import logging
import random
import struct
import uuid
from collections.abc import Callable

from trainer.standin import wire

log = logging.getLogger(__name__)

# EnvironmentParametersChannel.EnvironmentDataTypes and .SamplerTypes.
_FLOAT, _SAMPLER = 0, 1
_UNIFORM, _GAUSSIAN, _MULTIRANGE_UNIFORM = 0, 1, 2
# EngineConfigurationChannel.ConfigurationType -> number of values and their format.
_ENGINE_FIELDS = {
    0: ("screen_resolution", "ii"),
    1: ("quality_level", "i"),
    2: ("time_scale", "f"),
    3: ("target_frame_rate", "i"),
    4: ("capture_frame_rate", "i"),
}


def _sampler(reader: wire.Reader) -> Callable[[], float]:
    """Like Unity's samplers: each read draws a value from a generator seeded by the trainer."""
    rng = random.Random(reader.int32())  # noqa: S311 -- a simulation, not cryptography
    kind = reader.int32()
    if kind == _UNIFORM:
        low, high = reader.float32(), reader.float32()
        return lambda: rng.uniform(low, high)
    if kind == _GAUSSIAN:
        mean, std = reader.float32(), reader.float32()
        return lambda: rng.gauss(mean, std)
    if kind == _MULTIRANGE_UNIFORM:
        flat = reader.float32_list()
        intervals = list(zip(flat[::2], flat[1::2], strict=True))
        if not intervals:
            raise ValueError("multi-range sampler without intervals")
        # Unity picks an interval with probability proportional to its width.
        weights = [high - low for low, high in intervals]

        def draw() -> float:
            low, high = rng.choices(intervals, weights=weights)[0]
            return rng.uniform(low, high)

        return draw
    raise ValueError(f"unknown sampler type {kind}")


class EnvironmentParameters:
    """Values and samplers the trainer sets (curriculum, `environment_parameters` in the config)."""

    def __init__(self) -> None:
        self.values: dict[str, Callable[[], float]] = {}

    def get(self, key: str, default: float) -> float:
        """The parameter's current value (a new draw for a sampler), or `default` if never set."""
        source = self.values.get(key)
        return default if source is None else source()

    def receive(self, payload: bytes) -> None:
        """Apply one environment-parameters message."""
        reader = wire.Reader(payload)
        key = reader.string()
        kind = reader.int32()
        if kind == _FLOAT:
            value = reader.float32()
            self.values[key] = lambda: value
            log.info("environment parameter %s = %s", key, value)
        elif kind == _SAMPLER:
            self.values[key] = _sampler(reader)
            log.info("environment parameter %s sampled", key)
        else:
            raise ValueError(f"unknown environment parameter type {kind} for {key!r}")


class SideChannels:
    """Dispatches the side-channel records of each trainer message; never lets one crash the run."""

    def __init__(self) -> None:
        self.parameters = EnvironmentParameters()
        self.engine: dict[str, tuple[float | int, ...]] = {}
        self._warned: set[uuid.UUID] = set()

    def receive(self, data: bytes) -> None:
        """Handle every record in `data` (the `side_channel` bytes of a `UnityRLInputProto`)."""
        if not data:
            return
        try:
            for channel, payload in wire.split_side_channel(data):
                self._dispatch(channel, payload)
        except (ValueError, struct.error, UnicodeDecodeError) as error:
            # A Unity player logs a malformed side-channel message and carries on.
            log.error("malformed side-channel data ignored: %s", error)

    def _dispatch(self, channel: uuid.UUID, payload: bytes) -> None:
        if channel == wire.ENV_PARAMETERS_CHANNEL:
            self.parameters.receive(payload)
        elif channel == wire.ENGINE_CONFIG_CHANNEL:
            self._engine(payload)
        elif channel == wire.TRAINING_ANALYTICS_CHANNEL:
            log.debug("training analytics message (%d bytes) ignored", len(payload))
        elif channel not in self._warned:
            self._warned.add(channel)
            log.warning("unknown side channel %s ignored", channel)

    def _engine(self, payload: bytes) -> None:
        reader = wire.Reader(payload)
        kind = reader.int32()
        if kind not in _ENGINE_FIELDS:
            raise ValueError(f"unknown engine configuration type {kind}")
        name, formats = _ENGINE_FIELDS[kind]
        values = tuple(reader.int32() if f == "i" else reader.float32() for f in formats)
        # Nothing here renders or runs physics, so the settings are only recorded.
        self.engine[name] = values
        log.info("engine configuration %s = %s", name, values)
