"""The WebSocket `/jobs/{job_id}/stream`: a job's snapshot, then its every update, then its model.

A connection subscribes to the process's fan-out first (buffering live updates), then
catches up from the job's Redis Stream after the last id the client saw (or the snapshot's
position); when that stream no longer holds the entries after that id (trimmed, or gone) it
rebuilds them from the job's events instead. Then it drains its buffer, skipping ids it has
sent, so the client sees every update once, in log order. A job that has already ended is
served from its events alone. Blocking work (event store, job board, model store) runs in
worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from domain.errors import JobNotFoundError
from domain.job import Job, JobStatus
from gateway.auth import SCOPE_KEY
from gateway.endpoints import job_from_store
from gateway.fanout import Fanout, FanoutUnavailableError, Subscription
from gateway.services import Services, parse_job_id, services
from gateway.updates import (
    Outgoing,
    StreamId,
    format_stream_id,
    from_update,
    outgoing,
    parse_stream_id,
)
from trainer.modelstore import CHUNK_SIZE, ModelStore, ObjectNotFoundError
from trainer.modelstore import IntegrityError as ModelIntegrityError

log = logging.getLogger(__name__)

POLICY = 1008
UNSUPPORTED = 1003
INTERNAL = 1011
TRY_AGAIN = 1013
CATCH_UP_PAGE = 1000
MAX_REASON_BYTES = 123
TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class CloseError(Exception):
    """End the connection with this close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code} {reason}")


def parse_query(websocket: WebSocket) -> tuple[StreamId | None, bool]:
    """The `after` and `model` query parameters; 1008 naming the bad one."""
    query = websocket.query_params
    after = None
    if "after" in query:
        try:
            after = parse_stream_id(query["after"])
        except ValueError as error:
            raise CloseError(POLICY, f"after: {error}") from None
    model = query.get("model", "1")
    if model not in ("0", "1"):
        raise CloseError(POLICY, "model: must be 0 or 1")
    return after, model == "1"


def read_model(models: ModelStore, key: str, sha256: str) -> bytes:
    """The model's bytes, checked against the sha256 its job recorded (blocks)."""
    with models.open(key) as reader:
        if reader.info.sha256 != sha256:
            raise ModelIntegrityError(f"{key}: stored with sha256 {reader.info.sha256}")
        chunks = []
        while chunk := reader.read(CHUNK_SIZE):
            chunks.append(chunk)
    return b"".join(chunks)


def frame(message: dict[str, Any]) -> str:
    """A server message as compact JSON text."""
    return json.dumps(message, separators=(",", ":"))


class JobStream:
    """One client's stream of one job."""

    def __init__(self, websocket: WebSocket, svc: Services) -> None:
        self.ws = websocket
        self.svc = svc
        self.fanout: Fanout = svc.fanout
        self.job_id = websocket.path_params["job_id"]
        self.client_id = ""
        self.send_model = True
        self.last: StreamId = (0, 0)
        self._send_lock = asyncio.Lock()
        self._subscription: Subscription | None = None
        self._subscribed = anyio.Event()

    # --- sending ----------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one text frame (frames never interleave)."""
        async with self._send_lock:
            await self.ws.send_text(text)

    async def send_update(self, item: Outgoing) -> bool:
        """Send `item` unless already sent; True once the job has ended (and all was sent)."""
        if item.id <= self.last:
            return False
        await self.send_text(item.text)
        self.last = item.id
        if item.terminal:
            await self.finish(item.status)
            return True
        return False

    async def finish(self, status: str) -> None:
        """The model (of a completed job, unless turned off), then `end`."""
        if status == JobStatus.COMPLETED.value and self.send_model:
            job = await self.owned_job()
            if job.model_key is None or job.model_sha256 is None:
                raise CloseError(INTERNAL, "the completed job has no model recorded")
            try:
                data = await self.svc.run(
                    read_model, self.svc.models, job.model_key, job.model_sha256
                )
            except ObjectNotFoundError:
                raise CloseError(
                    INTERNAL, "the job's model is missing from the model store"
                ) from None
            except ModelIntegrityError as error:
                log.error("not sending the model of job %s: %s", job.id, error)
                raise CloseError(INTERNAL, "the stored model does not match its sha256") from None
            await self.send_text(
                frame({"type": "model", "sha256": job.model_sha256, "size": len(data)})
            )
            async with self._send_lock:
                await self.ws.send_bytes(data)
        await self.send_text(frame({"type": "end", "status": status}))

    # --- the stream -------------------------------------------------------------

    async def owned_job(self) -> Job:
        """The client's job from the event store; 1008 "job not found" for anyone else's."""
        try:
            return await self.svc.run(self.svc.owned_job, self.job_id, self.client_id)
        except JobNotFoundError:
            raise CloseError(POLICY, "job not found") from None

    async def snapshot(self, job: Job) -> StreamId:
        """Send the job's board row (or its state in the event store if not projected yet)."""
        row = await self.svc.run(self.svc.board.job, job.id, self.client_id)
        if row is None:
            position, body = 0, job_from_store(job)
        else:
            position, body = row["position"], {**row, "projected": True}
        at = (position, 0)
        await self.send_text(frame({"type": "snapshot", "id": format_stream_id(at), "job": body}))
        return at

    async def from_log(self) -> bool:
        """Send the updates after `self.last`, rebuilt from the job's events; True if it ended."""
        job_id = parse_job_id(self.job_id)
        updates = await self.svc.run(self.svc.history.updates, job_id, self.last)
        for update in updates:
            if await self.send_update(from_update(update)):
                return True
        return False

    async def catch_up(self) -> bool:
        """Send what the job's stream holds after `self.last`; True if the job ended.

        Each page is read together with the stream's state in one transaction: if entries
        after the page's start were trimmed away (the oldest one left is above it, and some
        were removed), or the stream is gone, the rest comes from the event log.
        """
        key = self.fanout.job_key(self.job_id)
        while True:
            pipe = self.fanout.redis.pipeline(transaction=True)
            pipe.xinfo_stream(key)
            pipe.xrange(key, f"({format_stream_id(self.last)}", "+", count=CATCH_UP_PAGE)
            info, entries = await pipe.execute(raise_on_error=False)
            if isinstance(entries, Exception):
                raise entries
            if isinstance(info, Exception) or self._lost_after(info):
                return await self.from_log()
            for entry_id, fields in entries:
                if await self.send_update(outgoing(entry_id, fields)):
                    return True
            if len(entries) < CATCH_UP_PAGE:
                return False

    def _lost_after(self, info: dict[str, Any]) -> bool:
        """Whether entries above `self.last` were trimmed from a stream with this XINFO."""
        trimmed = int(info["entries-added"]) > int(info["length"])
        if not trimmed:
            return False
        first = info.get("first-entry")
        if not first:  # trimmed empty: lost unless nothing was ever above `last`
            return parse_stream_id(info["last-generated-id"]) > self.last
        return parse_stream_id(first[0]) > self.last

    async def pump(self, after: StreamId | None) -> None:
        """Everything the client is to receive, in order, until the job ends."""
        job = await self.owned_job()
        if job.status in TERMINAL:
            self.last = await self.snapshot(job) if after is None else after
            if not await self.from_log():
                await self.finish(job.status.value)
            return
        sub = await self.fanout.subscribe(self.job_id)
        self._subscription = sub
        self._subscribed.set()
        try:
            self.last = await self.snapshot(job) if after is None else after
            if await self.catch_up():
                return
            while True:
                if await self.send_update(await sub.queue.get()):
                    return
        finally:
            self.fanout.unsubscribe(sub)

    async def overflow(self) -> None:
        """Wait until the client's queue overflows."""
        await self._subscribed.wait()
        assert self._subscription is not None
        await self._subscription.overflowed.wait()
        raise CloseError(TRY_AGAIN, self._subscription.reason)

    # --- the client's frames ----------------------------------------------------

    async def receive_json(self) -> dict[str, Any]:
        """The client's next frame, a JSON object with a `type`; 1003/1008 otherwise."""
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
        text = message.get("text")
        if text is None:
            raise CloseError(UNSUPPORTED, "binary frames are not supported")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise CloseError(UNSUPPORTED, "frames must be JSON text") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise CloseError(POLICY, 'frames must be JSON objects with a "type"')
        return data

    async def authenticate(self) -> str:
        """The client id, from the Authorization header (checked already) or the first frame."""
        found = self.ws.scope.get(SCOPE_KEY)
        if isinstance(found, str):
            return found
        timeout = self.svc.settings.ws_auth_timeout_s
        try:
            message = await asyncio.wait_for(self.receive_json(), timeout)
        except TimeoutError:
            raise CloseError(POLICY, f"no auth frame within {timeout:g} s") from None
        token = message.get("token")
        if message["type"] != "auth" or not isinstance(token, str) or not token:
            raise CloseError(POLICY, 'the first frame must be {"type":"auth","token":"<token>"}')
        client = await self.svc.run(self.svc.tokens.authenticate, token)
        if client is None:
            raise CloseError(POLICY, "the token is malformed, unknown or revoked")
        return client

    async def listen(self) -> None:
        """Answer pings until the client leaves; a bad frame closes the connection."""
        while True:
            message = await self.receive_json()
            kind = message["type"]
            if kind == "ping":
                await self.send_text(frame({"type": "pong"}))
            elif kind != "auth":  # a repeated auth frame changes nothing
                raise CloseError(POLICY, f"unknown message type {kind[:40]!r}")

    # --- the connection ---------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the job ends, the client leaves, or it must close."""
        self.client_id = await self.authenticate()
        after, self.send_model = parse_query(self.ws)
        # anyio, not bare asyncio tasks: its cancellation is delivered again at every await,
        # so a task cancelled while it waits for a worker thread (which asyncio's one-shot
        # cancel can lose) still stops once the thread returns.
        outcome: list[Exception | None] = []  # how each task ended, the first decides
        async with anyio.create_task_group() as group:

            async def first_decides(work: Callable[[], Awaitable[None]]) -> None:
                try:
                    await work()
                    outcome.append(None)
                except (CloseError, WebSocketDisconnect, FanoutUnavailableError, RedisError) as e:
                    outcome.append(e)  # raised below; anything else escapes the group
                group.cancel_scope.cancel()

            group.start_soon(first_decides, lambda: self.pump(after))
            group.start_soon(first_decides, self.listen)
            group.start_soon(first_decides, self.overflow)
        # Only the pump ends without an error: the job ended and everything was sent.
        if outcome[0] is not None:
            raise outcome[0]
        raise CloseError(1000, "")


async def close(websocket: WebSocket, code: int, reason: str, wait_s: float) -> None:
    """Close unless the client has gone; a client that never reads is dropped after `wait_s`.

    Closing waits while the client's send buffer is full, as every send does.
    """
    if websocket.application_state is not WebSocketState.CONNECTED:
        return
    # A close frame's reason holds at most 123 bytes of UTF-8 (it may quote client input).
    reason = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, TimeoutError):
        async with asyncio.timeout(wait_s):
            await websocket.close(code, reason)


async def job_stream(websocket: WebSocket) -> None:
    """WebSocket `/jobs/{job_id}/stream` (protocol in gateway/README.md)."""
    svc = services(websocket)
    await websocket.accept()
    code, reason = 1000, ""
    try:
        await JobStream(websocket, svc).run()
    except CloseError as error:
        code, reason = error.code, error.reason
    except WebSocketDisconnect:
        return
    except FanoutUnavailableError as error:
        code, reason = TRY_AGAIN, str(error)
    except RedisError as error:
        log.warning("stream of job %s: Redis failed: %s", websocket.path_params["job_id"], error)
        code, reason = TRY_AGAIN, "live updates are unavailable, try again later"
    except Exception:
        log.exception("stream of job %s failed", websocket.path_params["job_id"])
        code, reason = INTERNAL, "internal error"
    await close(websocket, code, reason, svc.settings.ws_close_timeout_s)
