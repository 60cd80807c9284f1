"""Hand-written protobuf encoding of a Unity player's per-step output, and side-channel records.

protobuf 3.20 has no compiled backend for Python 3.11 here, so building 8 `AgentInfoProto`s through
the generated classes costs about 1 ms per step. The player's output has a fixed, small shape, so it
is encoded directly in the wire format (a tenth of that); tests check that the generated classes
parse it back to the same message.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator, Sequence

# Side channels, by the ids ML-Agents gives them (uuid5 of their C# names).
STATS_CHANNEL = uuid.UUID("a1d8f7b7-cec8-50f9-b78b-d3e165a78520")
ENGINE_CONFIG_CHANNEL = uuid.UUID("e951342c-4f7e-11ea-b238-784f4387d1f7")
ENV_PARAMETERS_CHANNEL = uuid.UUID("534c891e-810f-11ea-a9d0-822485860400")
TRAINING_ANALYTICS_CHANNEL = uuid.UUID("b664a4a9-d86f-5a5f-95cb-e8353a7e8356")

STATUS_OK = 200
STATUS_CLOSE = 400

_INT32 = struct.Struct("<i")
_FLOAT32 = struct.Struct("<f")
# Unity's StatsAggregationMethod.Average.
_AGGREGATE_AVERAGE = 0
# DimensionProperty.NONE, what Unity's VectorSensor declares for each dimension.
_DIMENSION_NONE = 1


def varint(value: int) -> bytes:
    """Encode a non-negative integer as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2); `tag` is the field number."""
    return varint(tag << 3 | 2) + varint(len(payload)) + payload


def _packed_floats(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


class AgentInfoEncoder:
    """Encodes `AgentInfoProto`s with one float vector observation of a fixed size."""

    def __init__(self, obs_size: int) -> None:
        self.obs_size = obs_size
        # Everything in the observation except its float data is the same on every step. No
        # sensor name: the trainer parses every message three times in pure Python, and the name
        # alone doubled that cost.
        self._obs_head = (
            _field(1, varint(obs_size))  # shape, packed
            + _field(6, varint(_DIMENSION_NONE))  # dimension_properties, packed
        )
        self._floats_len = varint(4 * obs_size)
        self._float_data_len = varint(1 + len(self._floats_len) + 4 * obs_size)

    def encode(
        self,
        agent_id: int,
        reward: float,
        obs: Sequence[float],
        done: bool = False,
        max_step_reached: bool = False,
    ) -> bytes:
        """One `AgentInfoProto`: reward, done flags, episode id and the observation."""
        assert len(obs) == self.obs_size
        float_data = b"\x0a" + self._floats_len + _packed_floats(obs)  # FloatData.data
        observation = self._obs_head + b"\x22" + self._float_data_len + float_data  # float_data
        out = b"\x3d" + _FLOAT32.pack(reward)  # reward: field 7, fixed32
        if done:
            out += b"\x40\x01"
        if max_step_reached:
            out += b"\x48\x01"
        out += b"\x50" + varint(agent_id)  # id: field 10
        return out + _field(13, observation)  # observations


def unity_output_message(
    behavior_key: bytes,
    agent_infos: Sequence[bytes],
    side_channel: bytes = b"",
    initialization_output: bytes = b"",
) -> bytes:
    """A serialized `UnityMessageProto` (status 200) carrying one behaviour's agent infos.

    `initialization_output` is a serialized `UnityRLInitializationOutputProto`; it carries the
    `BrainParametersProto` the first time the behaviour's agents are sent.
    """
    infos = b"".join(_field(1, info) for info in agent_infos)  # ListAgentInfoProto.value
    entry = _field(1, behavior_key) + _field(2, infos)  # map entry of agentInfos
    rl_output = _field(2, entry)
    if side_channel:
        rl_output += _field(3, side_channel)
    unity_output = _field(1, rl_output)
    if initialization_output:
        unity_output += _field(2, initialization_output)
    return _field(1, b"\x08" + varint(STATUS_OK)) + _field(2, unity_output)


def header_only_message() -> bytes:
    """A serialized `UnityMessageProto` with only a status-200 header (second handshake message)."""
    return _field(1, b"\x08" + varint(STATUS_OK))


def side_channel_record(channel: uuid.UUID, payload: bytes) -> bytes:
    """One side-channel record: 16-byte UUID (little-endian fields), int32 length, payload."""
    return channel.bytes_le + _INT32.pack(len(payload)) + payload


def stat_record(key: str, value: float) -> bytes:
    """A stats side-channel record that the trainer averages over its summary period."""
    encoded = key.encode("ascii")
    payload = _INT32.pack(len(encoded)) + encoded + _FLOAT32.pack(value)
    return side_channel_record(STATS_CHANNEL, payload + _INT32.pack(_AGGREGATE_AVERAGE))


def split_side_channel(data: bytes) -> Iterator[tuple[uuid.UUID, bytes]]:
    """The (channel id, payload) records of a side-channel blob; raises ValueError if malformed."""
    offset = 0
    while offset < len(data):
        if offset + 20 > len(data):
            raise ValueError(f"truncated side-channel header at byte {offset}")
        channel = uuid.UUID(bytes_le=data[offset : offset + 16])
        (length,) = _INT32.unpack_from(data, offset + 16)
        start = offset + 20
        if length < 0 or start + length > len(data):
            raise ValueError(f"side-channel record of {length} bytes overruns the message")
        yield channel, data[start : start + length]
        offset = start + length


class Reader:
    """Reads the little-endian values ML-Agents' `OutgoingMessage` writes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.offset = 0

    def int32(self) -> int:
        """The next int32."""
        (value,) = _INT32.unpack_from(self.payload, self.offset)
        self.offset += 4
        return int(value)

    def float32(self) -> float:
        """The next float32."""
        (value,) = _FLOAT32.unpack_from(self.payload, self.offset)
        self.offset += 4
        return float(value)

    def float32_list(self) -> list[float]:
        """An int32 count followed by that many float32s."""
        return [self.float32() for _ in range(self.int32())]

    def string(self) -> str:
        """An int32 byte length followed by ASCII text."""
        length = self.int32()
        if length < 0 or self.offset + length > len(self.payload):
            raise ValueError("string overruns the side-channel message")
        text = self.payload[self.offset : self.offset + length].decode("ascii")
        self.offset += length
        return text
