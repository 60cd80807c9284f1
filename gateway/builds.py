"""Uploaded environment builds: `POST /builds` and `GET /builds/{sha256}`.

An upload is a `.tar.gz` or `.zip` of a Unity Linux server build (or a stand-in). It is
streamed to a temporary file while its sha256 is computed, checked by the rules of
`trainer.archive` (the ones train nodes unpack by), and stored in the model store under
`builds/{sha256}`. A job then names it as `env: {"sha256": ...}`; train nodes fetch it from
there on first use. Builds are addressed by content, so one build serves every client that
uploads the same bytes, and uploading it again stores nothing new.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import IO

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from domain.errors import FieldError
from gateway.auth import client_id
from gateway.errors import ApiError, bad_request
from gateway.services import Services, services
from trainer.archive import ArchiveError, ArchiveKind, ArchiveSettings, archive_kind, check_archive
from trainer.builds import build_key
from trainer.modelstore import ModelStoreError, StoredObject

GIB = 1024**3
WRITE_BATCH = 1024 * 1024  # request chunks are gathered to this size for each write to disk
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Content-Type (without parameters) -> the archive format the body must be.
MEDIA_TYPES: dict[str, ArchiveKind] = {
    "application/gzip": "tar.gz",
    "application/x-gzip": "tar.gz",
    "application/x-compressed-tar": "tar.gz",
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
}
_NAMES = {"tar.gz": "a gzip-compressed tar archive (.tar.gz)", "zip": "a zip archive (.zip)"}


class BuildSettings(ArchiveSettings):
    """Limits of build uploads, read from TRAINYARD_* variables (unpacked limits are shared)."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    build_limit_bytes: int = Field(
        2 * GIB, ge=1024, description="largest build archive accepted by POST /builds (413 above)"
    )
    build_upload_dir: Path | None = Field(
        None, description="where uploads are spooled while checked (unset: the system's temp dir)"
    )

    @field_validator("build_upload_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value


def build_settings(request: Request) -> BuildSettings:
    """The app's build settings: `app.state.build_settings` if set, else read once from the
    environment."""
    state = request.app.state
    found = getattr(state, "build_settings", None)
    if not isinstance(found, BuildSettings):
        found = BuildSettings()
        state.build_settings = found
    return found


class _Spool:
    """A temporary file the upload is written to, hashed on the way (methods block)."""

    def __init__(self, directory: Path | None) -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix="trainyard-build-", suffix=".upload")
        self.path = Path(name)
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.file.write(data)
        self.size += len(data)

    def finish(self) -> str:
        self.file.close()
        return self.digest.hexdigest()

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _expected_kind(request: Request) -> ArchiveKind:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    kind = MEDIA_TYPES.get(media_type)
    if kind is None:
        raise ApiError(
            415,
            "a build is uploaded as a .tar.gz (Content-Type: application/gzip) or a .zip"
            " (Content-Type: application/zip)",
        )
    return kind


def _refused(reason: str) -> ApiError:
    return ApiError(422, f"the build archive is refused: {reason}", [FieldError("body", reason)])


def _check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length", "must be a number of bytes")
        if int(declared) > limit:
            raise ApiError(413, f"the build is larger than the limit of {limit} bytes")


async def _receive(request: Request, svc: Services, spool: _Spool, limit: int) -> None:
    pending = bytearray()
    received = 0
    # Counted as it arrives: a chunked upload without Content-Length is cut off at the limit.
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ApiError(413, f"the build is larger than the limit of {limit} bytes")
        pending += chunk
        if len(pending) >= WRITE_BATCH:
            await svc.run(spool.write, bytes(pending))
            pending.clear()
    if pending:
        await svc.run(spool.write, bytes(pending))


def _unavailable(error: ModelStoreError) -> ApiError:
    return ApiError(503, f"the model store failed: {error}", headers={"Retry-After": "5"})


def _stat(svc: Services, key: str) -> StoredObject | None:
    """The stored archive's size and sha256, or None; 503 if the store fails (blocks)."""
    try:
        return svc.models.stat(key)
    except ModelStoreError as error:
        raise _unavailable(error) from None


def _check_kind(path: Path, expected: ArchiveKind) -> None:
    """The body is the format its Content-Type announces (blocks: reads the first bytes)."""
    kind = archive_kind(path)
    if kind != expected:
        raise ArchiveError(
            f"the Content-Type announces {_NAMES[expected]}, the body is {_NAMES[kind]}"
        )


async def upload_build(request: Request) -> Response:
    """Upload an environment build.
    ---
    summary: Upload an environment build (.tar.gz or .zip)
    description: >-
      The body is the archive of a Unity Linux server build: exactly one player at the top level
      (a file with an executable bit, or named *.x86_64; shared libraries aside), only regular
      files and directories, relative paths without '..', within the member and unpacked-size
      limits. The answer's sha256 (of the archive's bytes) is what a job names as
      env: {sha256: ...}; only the clients that uploaded a build can name it. Uploading the
      same archive again answers 200 and stores nothing.
    requestBody:
      required: true
      content:
        application/gzip: {schema: {type: string, format: binary}}
        application/zip: {schema: {type: string, format: binary}}
    responses:
      '201': {description: Build stored, content: {application/json: {schema: {type: object, required: [sha256, size], properties: {sha256: {type: string}, size: {type: integer}}}}}}
      '200': {description: The same build was stored before, content: {application/json: {schema: {type: object, required: [sha256, size], properties: {sha256: {type: string}, size: {type: integer}}}}}}
      '400': {$ref: '#/components/responses/Error'}
      '401': {$ref: '#/components/responses/Error'}
      '413': {$ref: '#/components/responses/Error'}
      '415': {$ref: '#/components/responses/Error'}
      '422': {$ref: '#/components/responses/Error'}
      '503': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    settings = build_settings(request)
    expected = _expected_kind(request)
    _check_length(request, settings.build_limit_bytes)
    spool = await svc.run(_Spool, settings.build_upload_dir)
    try:
        await _receive(request, svc, spool, settings.build_limit_bytes)
        sha256 = await svc.run(spool.finish)
        key = build_key(sha256)
        body = {"sha256": sha256, "size": spool.size}
        headers = {"Location": f"/builds/{sha256}"}
        try:
            await svc.run(_check_kind, spool.path, expected)
            stored = await svc.run(_stat, svc, key)
            if stored is not None and stored.sha256 == sha256:
                # Checked and stored before: the same bytes pass the same rules.
                await svc.run(svc.uploads.record, sha256, client_id(request))
                return JSONResponse(body, status_code=200, headers=headers)
            await svc.run(check_archive, spool.path, settings.limits())
        except ArchiveError as error:
            raise _refused(str(error)) from None
        try:
            await svc.run(svc.models.put_file, key, spool.path)
        except ModelStoreError as error:
            raise _unavailable(error) from None
        await svc.run(svc.uploads.record, sha256, client_id(request))
        return JSONResponse(body, status_code=201, headers=headers)
    finally:
        await svc.run(spool.discard)


async def get_build(request: Request) -> Response:
    """Whether a build is stored, and its size.
    ---
    summary: Get an uploaded build's metadata
    parameters:
      - {name: sha256, in: path, required: true, schema: {type: string, pattern: '^[0-9a-f]{64}$'}}
    responses:
      '200': {description: The build is stored, content: {application/json: {schema: {type: object, required: [sha256, size], properties: {sha256: {type: string}, size: {type: integer}}}}}}
      '401': {$ref: '#/components/responses/Error'}
      '404': {$ref: '#/components/responses/Error'}
      '503': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    sha256 = request.path_params["sha256"]
    if not _SHA256.fullmatch(sha256):
        raise ApiError(404, "no such build (a build's id is its sha256: 64 lowercase hex digits)")
    # Another client's build does not exist for this one.
    if not await svc.run(svc.uploads.uploaded, sha256, client_id(request)):
        raise ApiError(404, "no such build")
    stored = await svc.run(_stat, svc, build_key(sha256))
    if stored is None:
        raise ApiError(404, "no such build")
    return JSONResponse({"sha256": stored.sha256, "size": stored.size})
