"""The HTTP endpoints. Each docstring's YAML after `---` is its OpenAPI operation."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any
from uuid import UUID

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from domain.errors import FieldError
from domain.job import Job, JobStatus
from domain.spec import parse_job_spec
from gateway.auth import client_id
from gateway.errors import ApiError, bad_request
from gateway.nodes import list_nodes as list_nodes  # routed with the others
from gateway.services import Services, parse_job_id, services
from trainer.modelstore import CHUNK_SIZE, ObjectReader
from trainer.modelstore import IntegrityError as ModelIntegrityError

log = logging.getLogger(__name__)

DEFAULT_PAGE = 50
REQUEST_ID_MAX = 128
MAX_JSON_DEPTH = 32  # as deep as a job's YAML config may nest
STATUSES = tuple(s.value for s in JobStatus)


class ModelStreamAbortedError(Exception):
    """The model's bytes did not match their sha256 mid-transfer; the connection is dropped."""


# --- request helpers ------------------------------------------------------------


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body: 415 unless JSON, 413 past `limit` bytes, 400 if malformed.

    400 too for JSON nested deeper than MAX_JSON_DEPTH: no job spec needs that much, and
    deeper still Python's JSON parser runs out of stack.
    """
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "the body must be JSON, sent with Content-Type: application/json")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length", "must be a number of bytes")
        if int(declared) > limit:
            raise ApiError(413, f"the body is larger than the limit of {limit} bytes")
    body = bytearray()
    # Counted as it arrives: a chunked upload without Content-Length is cut off at the limit.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body is larger than the limit of {limit} bytes")
    too_deep = ApiError(400, f"the body's JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    except RecursionError:  # deeper than the parser's stack allows
        raise too_deep from None
    if nested_deeper_than(value, MAX_JSON_DEPTH):
        raise too_deep
    return value


def nested_deeper_than(value: object, limit: int) -> bool:
    """Whether arrays and objects in `value` nest more than `limit` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer query parameter within [low, high]; 400 naming it otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(name, f"must be an integer, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise bad_request(name, f"must be between {low} and {high}, got {value}")
    return value


def page_limit(request: Request, svc: Services) -> int:
    """The `limit` query parameter: 1..TRAINYARD_GATEWAY_MAX_PAGE_SIZE, 50 by default."""
    top = svc.settings.gateway_max_page_size
    limit = int_param(request, "limit", min(DEFAULT_PAGE, top), 1, top)
    assert limit is not None
    return limit


def split_request_id(body: object) -> tuple[object, str | None]:
    """The spec part of a submit body, and its optional `request_id`."""
    if not isinstance(body, dict) or "request_id" not in body:
        return body, None
    spec = {k: v for k, v in body.items() if k != "request_id"}
    request_id = body["request_id"]
    if (
        not isinstance(request_id, str)
        or not 1 <= len(request_id) <= REQUEST_ID_MAX
        or not request_id.isprintable()
    ):
        raise ApiError(
            422,
            "the request id is invalid",
            [FieldError("request_id", f"must be 1 to {REQUEST_ID_MAX} printable characters")],
        )
    return spec, request_id


def job_from_store(job: Job) -> dict[str, Any]:
    """A job the board has not caught up with yet, from the event store itself."""
    return {
        "job_id": str(job.id),
        "status": job.status.value,
        "attempt": job.attempt,
        "node_id": job.node_id,
        "reason": job.reason,
        "cancel_requested": job.cancel_requested,
        "model_sha256": job.model_sha256,
        "latest": None,
        "projected": False,
    }


# --- endpoints ------------------------------------------------------------------


async def submit_job(request: Request) -> Response:
    """Submit a training job.
    ---
    summary: Submit a training job
    description: >-
      The body is the job spec (config, env, seed, max_steps, num_envs, time_limit_s) plus an
      optional request_id; repeating a request_id with the same spec returns the same job.
      env.sha256 must name a build this client uploaded (POST /builds); 422 otherwise.
    requestBody:
      required: true
      content:
        application/json:
          schema: {$ref: '#/components/schemas/JobSubmission'}
    responses:
      '201': {description: Job recorded, content: {application/json: {schema: {$ref: '#/components/schemas/JobCreated'}}}}
      '400': {$ref: '#/components/responses/Error'}
      '401': {$ref: '#/components/responses/Error'}
      '409': {$ref: '#/components/responses/Error'}
      '413': {$ref: '#/components/responses/Error'}
      '415': {$ref: '#/components/responses/Error'}
      '422': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    body = await read_json(request, svc.settings.body_limit_bytes)
    spec_data, request_id = split_request_id(body)
    client = client_id(request)

    def submit() -> UUID:
        # One trip to a worker thread: YAML parsing is CPU work, the rest blocks.
        spec = parse_job_spec(spec_data)
        sha256 = spec.env.sha256
        if sha256 is not None and not svc.uploads.uploaded(sha256, client):
            reason = "no build with this sha256 was uploaded by this client (POST /builds first)"
            raise ApiError(422, f"env.sha256: {reason}", [FieldError("env.sha256", reason)])
        return svc.jobs.submit(spec, client, request_id)

    job_id = await svc.run(submit)
    return JSONResponse(
        {"job_id": str(job_id)}, status_code=201, headers={"Location": f"/jobs/{job_id}"}
    )


async def list_jobs(request: Request) -> Response:
    """The client's jobs, newest first.
    ---
    summary: List the client's jobs, newest first
    parameters:
      - {name: status, in: query, schema: {type: string, enum: [queued, claimed, running, completed, failed, cancelled]}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, default: 50}, description: 'at most TRAINYARD_GATEWAY_MAX_PAGE_SIZE (500 unless configured)'}
      - {name: cursor, in: query, schema: {type: string}, description: next_cursor of the previous page}
    responses:
      '200': {description: One page of jobs, content: {application/json: {schema: {$ref: '#/components/schemas/JobPage'}}}}
      '400': {$ref: '#/components/responses/Error'}
      '401': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    status = request.query_params.get("status")
    if status is not None and status not in STATUSES:
        raise bad_request("status", f"must be one of {', '.join(STATUSES)}")
    limit = page_limit(request, svc)
    cursor = request.query_params.get("cursor")
    try:
        page = await svc.run(
            lambda: svc.board.jobs(client_id(request), status=status, limit=limit, cursor=cursor)
        )
    except ValueError as error:
        raise bad_request("cursor", str(error)) from None
    return JSONResponse({"jobs": page.items, "next_cursor": page.next_cursor})


async def get_job(request: Request) -> Response:
    """One job's projected status, attempt, node and latest metrics.
    ---
    summary: Get one job
    parameters: [{$ref: '#/components/parameters/JobId'}]
    responses:
      '200': {description: The job, content: {application/json: {schema: {$ref: '#/components/schemas/Job'}}}}
      '401': {$ref: '#/components/responses/Error'}
      '404': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    job_id = parse_job_id(request.path_params["job_id"])
    client = client_id(request)
    row = await svc.run(svc.board.job, job_id, client)
    if row is not None:
        return JSONResponse({**row, "projected": True})
    # Submitted but not projected yet (or not the client's): ask the event store.
    job = await svc.run(svc.owned_job, str(job_id), client)
    return JSONResponse(job_from_store(job))


async def cancel_job(request: Request) -> Response:
    """Ask for a job to be cancelled.
    ---
    summary: Cancel a job
    description: >-
      A queued job is cancelled at once; a running one is stopped by its node (status stays
      running, cancel_requested true, until the node confirms). 409 once the job has ended.
    parameters: [{$ref: '#/components/parameters/JobId'}]
    responses:
      '202': {description: Cancellation recorded, content: {application/json: {schema: {$ref: '#/components/schemas/JobStatus'}}}}
      '401': {$ref: '#/components/responses/Error'}
      '404': {$ref: '#/components/responses/Error'}
      '409': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    client = client_id(request)

    def cancel() -> JobStatus:
        job = svc.owned_job(request.path_params["job_id"], client)
        return svc.jobs.request_cancel(job.id)

    status = await svc.run(cancel)
    return JSONResponse(
        {"job_id": str(parse_job_id(request.path_params["job_id"])), "status": status.value},
        status_code=202,
    )


async def job_metrics(request: Request) -> Response:
    """The job's metric series, one entry per progress report.
    ---
    summary: Get a job's metric series
    parameters:
      - {$ref: '#/components/parameters/JobId'}
      - {name: attempt, in: query, schema: {type: integer, minimum: 1, maximum: 1000}, description: only this attempt}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, default: 50}, description: 'at most TRAINYARD_GATEWAY_MAX_PAGE_SIZE (500 unless configured)'}
      - {name: cursor, in: query, schema: {type: string}, description: next_cursor of the previous page}
    responses:
      '200': {description: One page of reports in (attempt, seq) order, content: {application/json: {schema: {$ref: '#/components/schemas/MetricsPage'}}}}
      '400': {$ref: '#/components/responses/Error'}
      '401': {$ref: '#/components/responses/Error'}
      '404': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    attempt = int_param(request, "attempt", None, 1, 1000)
    limit = page_limit(request, svc)
    cursor = request.query_params.get("cursor")
    job = await svc.run(svc.owned_job, request.path_params["job_id"], client_id(request))
    try:
        page = await svc.run(
            lambda: svc.board.metrics(job.id, attempt=attempt, limit=limit, cursor=cursor)
        )
    except ValueError as error:
        raise bad_request("cursor", str(error)) from None
    return JSONResponse(
        {"job_id": str(job.id), "metrics": page.items, "next_cursor": page.next_cursor}
    )


async def job_events(request: Request) -> Response:
    """The job's recorded history, with log positions, for the audit.
    ---
    summary: Get a job's event history
    description: >-
      Events of the job and of its metrics stream, in log order. Each has its position in the
      event log (the same numbers as the job board's and the live updates'); pass the last
      position seen as `after` for the next page.
    parameters:
      - {$ref: '#/components/parameters/JobId'}
      - {name: after, in: query, schema: {type: integer, minimum: 0, maximum: 9223372036854775807, default: 0}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, default: 50}, description: 'at most TRAINYARD_GATEWAY_MAX_PAGE_SIZE (500 unless configured)'}
    responses:
      '200': {description: One page of events, content: {application/json: {schema: {$ref: '#/components/schemas/EventPage'}}}}
      '400': {$ref: '#/components/responses/Error'}
      '401': {$ref: '#/components/responses/Error'}
      '404': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    after = int_param(request, "after", 0, 0, 2**63 - 1)
    assert after is not None
    limit = page_limit(request, svc)
    job = await svc.run(svc.owned_job, request.path_params["job_id"], client_id(request))
    events = await svc.run(lambda: svc.history.events(job.id, after=after, limit=limit))
    next_after = events[-1]["position"] if len(events) == limit else None
    return JSONResponse({"job_id": str(job.id), "events": events, "next_after": next_after})


async def job_model(request: Request) -> Response:
    """The trained model of a completed job.
    ---
    summary: Download a job's trained model (.onnx)
    description: >-
      The bytes are hashed as they are read from the model store; if they do not match the
      recorded sha256 the transfer is aborted (the body ends short of Content-Length).
    parameters: [{$ref: '#/components/parameters/JobId'}]
    responses:
      '200':
        description: The .onnx model
        headers:
          X-Model-SHA256: {description: sha256 of the body (lowercase hex), schema: {type: string}}
        content: {application/octet-stream: {schema: {type: string, format: binary}}}
      '401': {$ref: '#/components/responses/Error'}
      '404': {$ref: '#/components/responses/Error'}
      '409': {$ref: '#/components/responses/Error'}
    """
    svc = services(request)
    job = await svc.run(svc.owned_job, request.path_params["job_id"], client_id(request))
    if job.status is not JobStatus.COMPLETED or job.model_key is None:
        raise ApiError(409, f"the job is {job.status.value}; its model is there once it completes")
    reader: ObjectReader = await svc.run(svc.models.open, job.model_key)
    if reader.info.sha256 != job.model_sha256:
        await svc.run(reader.close)
        raise ApiError(502, "the stored model does not match the sha256 its job recorded")
    filename = job.model_key.rsplit("/", 1)[-1]

    async def chunks() -> AsyncIterator[bytes]:
        # The reader checks the sha256 when it reaches the end, so each chunk is held back
        # until the next one is read: a mismatch then stops the body short of its
        # Content-Length, and a client never receives a corrupted model whole.
        try:
            held = await svc.run(reader.read, CHUNK_SIZE)
            while held:
                following = await svc.run(reader.read, CHUNK_SIZE)
                yield held
                held = following
        except ModelIntegrityError as error:
            log.error("aborted sending the model of job %s: %s", job.id, error)
            raise ModelStreamAbortedError(str(error)) from error
        finally:
            with anyio.CancelScope(shield=True):
                await svc.run(reader.close)

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(reader.info.size),
            "X-Model-SHA256": reader.info.sha256,
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )


async def healthz(request: Request) -> Response:
    """Liveness, and the state of each dependency.
    ---
    summary: Health of the gateway and its dependencies
    security: []
    responses:
      '200': {description: Every dependency answers, content: {application/json: {schema: {$ref: '#/components/schemas/Health'}}}}
      '503': {description: A dependency does not answer, content: {application/json: {schema: {$ref: '#/components/schemas/Health'}}}}
    """  # noqa: E501
    svc = services(request)
    checks: dict[str, dict[str, Any]] = {}

    async def check(name: str, probe: Any) -> None:
        try:
            with anyio.fail_after(3):
                await probe()
        except Exception as error:  # noqa: BLE001 -- every failure is the answer here
            first_line = (str(error).splitlines() or [""])[0]
            checks[name] = {"ok": False, "error": f"{type(error).__name__}: {first_line}"[:200]}
        else:
            checks[name] = {"ok": True}

    async def event_store() -> None:
        await svc.run(svc.jobs.recorder.max_notification_id)

    async def job_board() -> None:
        await svc.run(svc.board.ready)

    async def redis() -> None:
        await svc.redis.ping()

    async with anyio.create_task_group() as tg:
        tg.start_soon(check, "event_store", event_store)
        tg.start_soon(check, "job_board", job_board)
        tg.start_soon(check, "redis", redis)
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "degraded", "checks": dict(sorted(checks.items()))},
        status_code=200 if ok else 503,
    )
