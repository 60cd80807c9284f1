"""HTTP and WebSocket access to a Trainyard gateway, for the command-line client.

`Gateway` wraps the HTTP API (one method per endpoint, every page of a paginated list);
`JobStream` follows `/jobs/{id}/stream`, reconnecting with `after=<last id>` when the
connection drops or the gateway closes it as too slow (1013), so the caller sees every update
once and in order. Failures become `CliError`s that say what to do, each with an exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

DEFAULT_URL: Final = "http://127.0.0.1:8000"
STATUSES: Final = ("queued", "claimed", "running", "completed", "failed", "cancelled")
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})

# Exit codes (2 is a usage error, as click reports it).
EXIT_FAILED: Final = 1  # the gateway refused the request, or the job failed
EXIT_UNREACHABLE: Final = 3  # no gateway answers at the URL
EXIT_AUTH: Final = 4  # the token is missing or refused
EXIT_VERIFY: Final = 5  # a model or a rerun did not verify

AUTH_HINT: Final = (
    "pass --token or set TRAINYARD_TOKEN; an operator creates one with "
    "`trainyard token create CLIENT_ID` (`trainyard local` prints one)"
)
_CHUNK: Final = 256 * 1024


class CliError(Exception):
    """A failure to show the user, with the exit code it ends the command with."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ApiError(CliError):
    """The gateway answered with an error status."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, str]]) -> None:
        self.status = status
        self.detail = detail
        self.errors = errors
        lines = [f"{detail} (HTTP {status})"]
        lines += [f"  {e.get('field', '?')}: {e.get('reason', '')}" for e in errors]
        if status == 401:
            lines.append(f"  {AUTH_HINT}")
        super().__init__("\n".join(lines), EXIT_AUTH if status == 401 else EXIT_FAILED)


def unreachable(url: str, error: object) -> CliError:
    """The error for a gateway that does not answer."""
    return CliError(
        f"cannot reach the gateway at {url}: is it running? (trainyard local)\n  ({error})",
        EXIT_UNREACHABLE,
    )


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class ModelFile:
    """A model saved to disk after its sha256 was checked."""

    path: Path
    sha256: str
    size: int


def save_verified(data: bytes, sha256: str, dest: Path) -> ModelFile:
    """Write `data` to `dest` (atomically) if its sha256 is `sha256`; raise otherwise."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CliError(
            f"the model's sha256 is {actual}, not the {sha256} the gateway announced; "
            "nothing was saved",
            EXIT_VERIFY,
        )
    partial = dest.with_name(dest.name + ".partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, dest)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CliError(f"cannot save the model to {dest}: {error}") from error
    return ModelFile(dest, actual, len(data))


class Gateway:
    """The gateway's HTTP API, as the signed-in client sees it."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CliError(f"the gateway URL must be http(s)://HOST[:PORT], got {url!r}", 2)
        self._http = httpx.Client(base_url=self.url, headers=_auth_headers(token), timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------

    @staticmethod
    def _job_path(job_id: str, suffix: str = "") -> str:
        return f"/jobs/{quote(job_id, safe='')}{suffix}"

    def _raise_for(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            errors = body.get("errors")
            field_errors = (
                [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
            )
            raise ApiError(response.status_code, body["detail"], field_errors)
        text = response.text.strip()[:200] or response.reason_phrase
        raise ApiError(response.status_code, f"the gateway answered: {text}", [])

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; connection failures and error statuses raise CliError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise unreachable(self.url, error) from error
        except httpx.HTTPError as error:
            raise CliError(f"the request to {self.url}{path} failed: {error}") from error
        self._raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as error:
            raise CliError(f"the gateway's answer to {path} is not JSON: {error}") from error

    # --- endpoints ----------------------------------------------------------

    def submit(self, spec: dict[str, Any], request_id: str | None = None) -> str:
        """Submit a job; returns its id."""
        body = {**spec, **({"request_id": request_id} if request_id else {})}
        answer = self._json("POST", "/jobs", json=body)
        return str(answer["job_id"])

    def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The client's jobs, newest first, up to `limit` (following pages)."""
        jobs: list[dict[str, Any]] = []
        cursor: str | None = None
        while len(jobs) < limit:
            params: dict[str, Any] = {"limit": min(limit - len(jobs), 500)}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = self._json("GET", "/jobs", params=params)
            jobs += page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return jobs

    def job(self, job_id: str) -> dict[str, Any]:
        """One job as the board shows it."""
        answer: dict[str, Any] = self._json("GET", self._job_path(job_id))
        return answer

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask for the job to be cancelled."""
        answer: dict[str, Any] = self._json("POST", self._job_path(job_id, "/cancel"))
        return answer

    def metrics(self, job_id: str, attempt: int | None = None) -> list[dict[str, Any]]:
        """Every progress report of the job (all pages), in (attempt, seq) order."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if attempt is not None:
                params["attempt"] = attempt
            if cursor:
                params["cursor"] = cursor
            page = self._json("GET", self._job_path(job_id, "/metrics"), params=params)
            items += page["metrics"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    def events_page(self, job_id: str, *, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` of the job's events after log position `after`."""
        params = {"after": after, "limit": limit}
        page = self._json("GET", self._job_path(job_id, "/events"), params=params)
        events: list[dict[str, Any]] = page["events"]
        return events

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's whole recorded history (all pages), in log order."""
        items: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self._json(
                "GET", self._job_path(job_id, "/events"), params={"after": after, "limit": 500}
            )
            items += page["events"]
            if page.get("next_after") is None:
                return items
            after = int(page["next_after"])

    def nodes(self) -> Any:
        """The live train nodes."""
        return self._json("GET", "/nodes")

    def health(self) -> dict[str, Any]:
        """The gateway's health (a degraded gateway answers too)."""
        try:
            response = self._http.get("/healthz")
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise unreachable(self.url, error) from error
        except httpx.HTTPError as error:
            raise CliError(f"the request to {self.url}/healthz failed: {error}") from error
        answer: dict[str, Any] = response.json()
        return answer

    def download_model(self, job_id: str, dest: Path) -> ModelFile:
        """Stream the job's model to `dest`, checking it against the X-Model-SHA256 header.

        The bytes go to `dest.partial` first and replace `dest` only once they verify.
        """
        path = self._job_path(job_id, "/model")
        partial = dest.with_name(dest.name + ".partial")
        digest = hashlib.sha256()
        size = 0
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                expected = response.headers.get("x-model-sha256", "").lower()
                if not expected:
                    raise CliError("the gateway sent the model without an X-Model-SHA256 header")
                with partial.open("wb") as file:
                    for chunk in response.iter_bytes(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        file.write(chunk)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            partial.unlink(missing_ok=True)
            raise unreachable(self.url, error) from error
        except httpx.HTTPError as error:
            partial.unlink(missing_ok=True)
            raise CliError(
                f"the model transfer broke off after {size} bytes ({error}); "
                "the gateway stops a transfer whose bytes do not match the recorded sha256",
                EXIT_VERIFY,
            ) from error
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise CliError(f"cannot save the model to {dest}: {error}") from error
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        actual = digest.hexdigest()
        if actual != expected:
            partial.unlink(missing_ok=True)
            raise CliError(
                f"the model's sha256 is {actual}, but the gateway announced {expected}; "
                "nothing was saved",
                EXIT_VERIFY,
            )
        os.replace(partial, dest)
        return ModelFile(dest, actual, size)


# --- the live stream ------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The job as it was when the stream started."""

    id: str
    job: dict[str, Any]


@dataclass(frozen=True)
class Update:
    """One change of the job, in log order."""

    id: str
    update: dict[str, Any]


@dataclass(frozen=True)
class Model:
    """The trained model, pushed when the job completed; its sha256 already checked."""

    sha256: str
    data: bytes


@dataclass(frozen=True)
class End:
    """The job ended and everything was sent."""

    status: str


@dataclass(frozen=True)
class Reconnecting:
    """The connection was lost; the stream resumes after `after` in `delay` seconds."""

    reason: str
    delay: float
    after: str | None
    attempt: int


StreamItem = Snapshot | Update | Model | End | Reconnecting


def _position(entry_id: str) -> int:
    head = entry_id.partition("-")[0]
    return int(head) if head.isdigit() else -1


class _Retry(Exception):
    """The connection ended in a way worth reconnecting after."""


class JobStream:
    """Follows one job's live updates to its end, resuming after dropped connections."""

    def __init__(
        self,
        url: str,
        token: str | None,
        job_id: str,
        *,
        model: bool = True,
        after: str | None = None,
        max_retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        open_timeout_s: float = 10.0,
    ) -> None:
        parts = urlsplit(url.rstrip("/"))
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        self.base = urlunsplit((scheme, parts.netloc, parts.path, "", ""))
        self.http_url = url.rstrip("/")
        self.token = token
        self.job_id = job_id
        self.model = model
        self.after = after
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.open_timeout_s = open_timeout_s
        self.reconnects = 0

    def _url(self) -> str:
        query: dict[str, str] = {}
        if self.after is not None:
            query["after"] = self.after
        if not self.model:
            query["model"] = "0"
        suffix = f"?{urlencode(query)}" if query else ""
        return f"{self.base}/jobs/{quote(self.job_id, safe='')}/stream{suffix}"

    async def __aiter__(self) -> AsyncGenerator[StreamItem, None]:
        failures = 0
        while True:
            try:
                async with connect(
                    self._url(),
                    additional_headers=_auth_headers(self.token),
                    max_size=None,  # the model arrives as one binary frame
                    open_timeout=self.open_timeout_s,
                    proxy=None,
                ) as ws:
                    async for item in self._messages(ws):
                        failures = 0
                        yield item
                        if isinstance(item, End):
                            return
                    code, reason = ws.close_code, ws.close_reason or ""
            except InvalidStatus as error:
                status = error.response.status_code
                if status in (401, 403):
                    raise CliError(
                        f"the gateway refused the stream (HTTP {status}): the token is missing, "
                        f"malformed, unknown or revoked\n  {AUTH_HINT}",
                        EXIT_AUTH,
                    ) from None
                if status == 404:
                    raise CliError(f"{self.http_url} has no stream for job {self.job_id}") from None
                code, reason = None, f"HTTP {status} on connect"
            except ConnectionClosed as error:
                close = error.rcvd
                code = close.code if close else 1006
                reason = (close.reason if close else "") or "connection lost"
            except _Retry as error:
                code, reason = None, str(error)
            except (OSError, TimeoutError, InvalidHandshake) as error:
                if failures == 0 and self.reconnects == 0 and isinstance(error, OSError):
                    raise unreachable(self.http_url, error) from error
                code, reason = None, f"{type(error).__name__}: {error}".rstrip(": ")
            self._check_close(code, reason)
            failures += 1
            if failures > self.max_retries:
                raise CliError(
                    f"lost the stream of job {self.job_id} and could not resume it after "
                    f"{self.max_retries} tries: {reason}",
                    EXIT_UNREACHABLE,
                )
            delay = 0.0 if code == 1013 and failures == 1 else self._delay(failures)
            self.reconnects += 1
            label = f"closed {code}: {reason}" if code is not None else reason
            yield Reconnecting(label, delay, self.after, failures)
            await asyncio.sleep(delay)

    def _delay(self, failures: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2.0 ** (failures - 1))
        return base * random.uniform(0.8, 1.2)  # noqa: S311 -- jitter, not security

    def _check_close(self, code: int | None, reason: str) -> None:
        """Raise for a close that a reconnect cannot mend."""
        if code == 1008:
            if "not found" in reason:
                raise CliError(f"job {self.job_id} not found ({reason})")
            raise CliError(f"the gateway closed the stream: {reason}\n  {AUTH_HINT}", EXIT_AUTH)
        if code == 1003:
            raise CliError(f"the gateway refused a message of this client: {reason}")
        if code == 1011:
            exit_code = EXIT_VERIFY if "sha256" in reason else EXIT_FAILED
            raise CliError(f"the gateway could not serve the stream: {reason}", exit_code)

    async def _messages(self, ws: ClientConnection) -> AsyncIterator[StreamItem]:
        pending: dict[str, Any] | None = None  # a model header, waiting for its bytes
        async for message in ws:
            if isinstance(message, bytes):
                if pending is None:
                    raise _Retry("binary frame without a model header")
                data, header, pending = message, pending, None
                sha256 = str(header.get("sha256", "")).lower()
                actual = hashlib.sha256(data).hexdigest()
                if actual != sha256 or header.get("size", len(data)) != len(data):
                    raise CliError(
                        f"the pushed model does not verify: {len(data)} bytes with sha256 "
                        f"{actual}, announced {header.get('size')} bytes with {sha256}",
                        EXIT_VERIFY,
                    )
                yield Model(sha256, data)
                continue
            try:
                frame = json.loads(message)
            except ValueError:
                raise _Retry(f"a frame that is not JSON: {message[:80]!r}") from None
            kind = frame.get("type") if isinstance(frame, dict) else None
            if kind == "snapshot":
                self.after = str(frame["id"])
                yield Snapshot(self.after, frame["job"])
            elif kind == "update":
                entry = str(frame["id"])
                if self.after is not None and _position(entry) <= _position(self.after):
                    continue  # already seen (cannot happen with a correct server)
                self.after = entry
                yield Update(entry, frame["update"])
            elif kind == "model":
                pending = frame
            elif kind == "end":
                yield End(str(frame.get("status", "")))
            # pong and types this client does not know change nothing


def stream_items(
    stream: JobStream, check: Callable[[], None] | None = None, interval_s: float = 0.5
) -> Iterator[StreamItem]:
    """Run the stream on a private event loop, yielding its items synchronously.

    `check`, if given, is called every `interval_s` while waiting; whatever it raises ends the
    stream (local mode uses it to notice a process that died).
    """
    loop = asyncio.new_event_loop()
    iterator = stream.__aiter__()

    async def following() -> StreamItem:
        return await anext(iterator)

    try:
        while True:
            task = loop.create_task(following())
            try:
                while not task.done():
                    loop.run_until_complete(asyncio.wait([task], timeout=interval_s))
                    if check is not None and not task.done():
                        check()
            except BaseException:
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
                raise
            try:
                yield task.result()
            except StopAsyncIteration:
                return
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(iterator.aclose())
        loop.close()
