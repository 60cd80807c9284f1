"""Where train nodes put trained models and checkpoints, and where the gateway reads them back.

Keys look like `jobs/{job_id}/attempt-{n}/{filename}` (see `model_key`). Every stored object
carries the sha256 of its bytes: the local store keeps it in a hidden sidecar file, S3 in the
object metadata (`x-amz-meta-sha256`). Readers hash what they stream and raise `IntegrityError`
at the end if the bytes do not match, so a corrupted model is never served as a good one.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from uuid import UUID

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CHUNK_SIZE = 1024 * 1024
MAX_KEY_LENGTH = 512  # well under S3's 1024 bytes; each segment also fits a file name (255)
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SHA_METADATA = "sha256"  # sent as the x-amz-meta-sha256 header


class ModelStoreError(Exception):
    """A model store operation failed."""


class ObjectNotFoundError(ModelStoreError, LookupError):
    """No object is stored under the key."""


class IntegrityError(ModelStoreError):
    """Stored bytes do not match their sha256."""


@dataclass(frozen=True)
class StoredObject:
    """One stored object: its key, size in bytes and sha256 (lowercase hex)."""

    key: str
    size: int
    sha256: str


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise ValueError saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError("model store key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"model store key is {len(key)} characters long; at most {MAX_KEY_LENGTH}")
    if "\\" in key:
        raise ValueError(f"model store key {key!r} contains a backslash; separate with '/'")
    if key.startswith("/"):
        raise ValueError(f"model store key {key!r} is absolute; keys are relative")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"model store key {key!r} has an empty, '.' or '..' segment")
        # A leading letter or digit keeps keys apart from the local store's hidden
        # temporary and sidecar files, which start with a dot.
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"model store key {key!r}: segment {segment!r} must start with a letter or digit"
                " and hold only letters, digits, '.', '_' and '-'"
            )
    return key


def model_key(job_id: UUID, attempt: int, filename: str) -> str:
    """The key of a file uploaded by one attempt of a job: jobs/{job_id}/attempt-{n}/{filename}."""
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, not {attempt}")
    if "/" in filename:
        raise ValueError(f"filename {filename!r} must not contain '/'")
    return validate_key(f"jobs/{job_id}/attempt-{attempt}/{filename}")


def _hash_file(path: Path) -> tuple[str, int]:
    """The sha256 and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ObjectReader:
    """An open stored object: its `info`, and its bytes by `read` or as an iterator of chunks.

    Raises IntegrityError at the end of the bytes if they do not match `info.sha256`.
    """

    def __init__(
        self,
        info: StoredObject,
        read: Callable[[int], bytes],
        close: Callable[[], None],
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.info = info
        self._read = read
        self._close = close
        self._chunk_size = chunk_size
        self._digest = hashlib.sha256()
        self._count = 0
        self._checked = False

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all the rest if negative); b"" at the end."""
        if size < 0:
            chunks = []
            while chunk := self.read(self._chunk_size):
                chunks.append(chunk)
            return b"".join(chunks)
        if size == 0:
            return b""
        data = self._read(size)
        if data:
            self._digest.update(data)
            self._count += len(data)
        else:
            self._check()
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(self._chunk_size):
            yield chunk

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        sha256 = self._digest.hexdigest()
        if self._count != self.info.size or sha256 != self.info.sha256:
            raise IntegrityError(
                f"{self.info.key}: read {self._count} bytes with sha256 {sha256}; "
                f"stored as {self.info.size} bytes with sha256 {self.info.sha256}"
            )

    def close(self) -> None:
        """Release the file or connection."""
        self._close()

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ModelStore(abc.ABC):
    """Stores files under validated keys, each with its sha256."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> StoredObject:
        """Store the file at `path` under `key` (replacing any object there); all or nothing."""

    @abc.abstractmethod
    def open(self, key: str) -> ObjectReader:
        """Open the object for streaming; raises ObjectNotFoundError if there is none."""

    @abc.abstractmethod
    def stat(self, key: str) -> StoredObject | None:
        """The object's size and sha256, or None if there is no object under `key`."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix` + '/'; return how many."""


def verify(store: ModelStore, key: str, sha256: str) -> bool:
    """Whether the object under `key` exists and its bytes, read back and hashed, have `sha256`."""
    digest = hashlib.sha256()
    try:
        with store.open(key) as reader:
            for chunk in reader:
                digest.update(chunk)
    except (ObjectNotFoundError, IntegrityError):
        return False
    return digest.hexdigest() == sha256.lower()


class LocalModelStore(ModelStore):
    """Objects as files under `root`, written atomically; the default store.

    One writer per key at a time (each attempt has its own keys); readers may run at any time.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        validate_key(key)
        root = self.root.resolve()
        # resolve() follows symlinks, so a link inside the root cannot lead a key outside it.
        path = (root / key).resolve()
        if not path.is_relative_to(root) or path == root:
            raise ValueError(f"model store key {key!r} leads outside {root}")
        return path

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(f".{path.name}.sha256")

    def put_file(self, key: str, path: Path) -> StoredObject:
        """Copy the file into the store (temp file, fsync, rename), hashing it on the way."""
        target = self._path(key)
        # Open the source first: a missing source then fails before anything is created.
        with Path(path).open("rb") as source:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            temp = Path(temp_name)
            try:
                digest = hashlib.sha256()
                size = 0
                with os.fdopen(fd, "wb") as out:
                    while chunk := source.read(CHUNK_SIZE):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                    out.flush()
                    # mkstemp creates 0600; models are read by the gateway, maybe as another user.
                    os.fchmod(out.fileno(), 0o644)
                    os.fsync(out.fileno())
                sha256 = digest.hexdigest()
                # The old sidecar goes first and the new one comes after the data, so that
                # a crash in between leaves no sidecar (the hash is then recomputed), never
                # a sidecar describing other bytes.
                self._sidecar(target).unlink(missing_ok=True)
                os.replace(temp, target)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        self._write_sidecar(target, sha256, size)
        _fsync_dir(target.parent)
        return StoredObject(key, size, sha256)

    def _write_sidecar(self, target: Path, sha256: str, size: int) -> None:
        sidecar = self._sidecar(target)
        fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f"{sidecar.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"sha256": sha256, "size": size}, out)
                out.flush()
                os.fchmod(out.fileno(), 0o644)
                os.fsync(out.fileno())
            os.replace(temp_name, sidecar)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def _stored_sha256(self, path: Path, key: str) -> str:
        """The sha256 recorded at put time, or the hash of the bytes if no sidecar survived."""
        try:
            recorded = json.loads(self._sidecar(path).read_text())
        except FileNotFoundError:
            return _hash_file(path)[0]
        except (OSError, ValueError) as error:
            raise ModelStoreError(f"{key}: unreadable sha256 sidecar: {error}") from error
        sha256 = recorded.get("sha256") if isinstance(recorded, dict) else None
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ModelStoreError(f"{key}: sha256 sidecar holds no valid sha256")
        return sha256

    def open(self, key: str) -> ObjectReader:
        """Open the file for streaming."""
        path = self._path(key)
        try:
            file = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
            raise ObjectNotFoundError(f"no object under {key!r}") from error
        try:
            size = os.fstat(file.fileno()).st_size
            info = StoredObject(key, size, self._stored_sha256(path, key))
        except BaseException:
            file.close()
            raise
        return ObjectReader(info, file.read, file.close)

    def stat(self, key: str) -> StoredObject | None:
        """Size from the file system, sha256 from the sidecar."""
        path = self._path(key)
        if not path.is_file():
            return None
        return StoredObject(key, path.stat().st_size, self._stored_sha256(path, key))

    def delete_prefix(self, prefix: str) -> int:
        """Remove the directory of `prefix`, counting the objects in it."""
        directory = self._path(prefix.removesuffix("/"))
        if not directory.is_dir():
            return 0
        count = 0
        for dirpath, _dirnames, filenames in os.walk(directory, topdown=False):
            for name in filenames:
                # Hidden files are sidecars or temp files of puts, not objects.
                count += not name.startswith(".")
                Path(dirpath, name).unlink()
            Path(dirpath).rmdir()
        return count


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3ModelStore(ModelStore):
    """Objects in an S3 (or S3-compatible) bucket, sha256 in the object metadata.

    With `verify_download` (the default) every upload is read back and hashed before
    `put_file` returns; without it, a HEAD checks the size and the stored sha256 only.
    """

    def __init__(
        self,
        bucket: str,
        client: Any,
        *,
        transfer_config: TransferConfig | None = None,
        verify_download: bool = True,
    ) -> None:
        self.bucket = bucket
        self.client = client
        self.transfer_config = transfer_config or TransferConfig()
        self.verify_download = verify_download

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put_file(self, key: str, path: Path) -> StoredObject:
        """Upload (multipart when large), then check what S3 holds; a bad upload is deleted."""
        validate_key(key)
        # The hash goes in the metadata, which S3 takes before the first byte: hash first.
        sha256, size = _hash_file(Path(path))
        try:
            self.client.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={
                    "Metadata": {_SHA_METADATA: sha256},
                    "ContentType": "application/octet-stream",
                },
                Config=self.transfer_config,
            )
        except (BotoCoreError, ClientError, S3UploadFailedError) as error:
            raise ModelStoreError(f"{self._where(key)}: upload failed: {error}") from error
        problem = self._upload_problem(key, size, sha256)
        if problem:
            # Best effort: the IntegrityError below is the news; a failed cleanup must not hide it.
            with contextlib.suppress(BotoCoreError, ClientError):
                self.client.delete_object(Bucket=self.bucket, Key=key)
            raise IntegrityError(
                f"{self._where(key)}: {problem}; uploaded {size} bytes with sha256 {sha256}"
            )
        return StoredObject(key, size, sha256)

    def _upload_problem(self, key: str, size: int, sha256: str) -> str | None:
        """What is wrong with the object just uploaded, or None."""
        try:
            stored = self.stat(key)
        except ModelStoreError as error:  # e.g. an S3-compatible server that drops metadata
            return str(error)
        if stored is None:
            return "object missing after upload"
        if stored.size != size or stored.sha256 != sha256:
            return f"S3 holds {stored.size} bytes, sha256 {stored.sha256}"
        if self.verify_download and not verify(self, key, sha256):
            # Also catches the file changing between hashing and upload.
            return "bytes read back do not match"
        return None

    def _info(self, key: str, response: dict[str, Any]) -> StoredObject:
        sha256 = response.get("Metadata", {}).get(_SHA_METADATA)
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ModelStoreError(f"{self._where(key)} has no valid x-amz-meta-sha256 metadata")
        return StoredObject(key, int(response["ContentLength"]), sha256)

    def open(self, key: str) -> ObjectReader:
        """GET the object and stream its body."""
        validate_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in ("NoSuchKey", "404"):
                raise ObjectNotFoundError(f"no object under {self._where(key)}") from error
            raise ModelStoreError(f"{self._where(key)}: {error}") from error
        body = response["Body"]
        try:
            info = self._info(key, response)
        except BaseException:
            body.close()
            raise
        return ObjectReader(info, body.read, body.close)

    def stat(self, key: str) -> StoredObject | None:
        """HEAD the object."""
        validate_key(key)
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ModelStoreError(f"{self._where(key)}: {error}") from error
        return self._info(key, response)

    def delete_prefix(self, prefix: str) -> int:
        """List and delete in batches of up to 1000 keys (the DeleteObjects limit)."""
        prefix = validate_key(prefix.removesuffix("/")) + "/"
        count = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if not keys:
                continue
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
            )
            if errors := response.get("Errors"):
                raise ModelStoreError(f"{self._where(prefix)}: could not delete {errors[:3]}")
            count += len(keys)
        return count


class ModelStoreSettings(BaseSettings):
    """Which model store a process uses, read from TRAINYARD_* variables."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    model_store: Literal["local", "s3"] = Field(
        "local", description="local (a directory, the default) or s3"
    )
    model_dir: Path = Field(Path("var/models"), description="directory of the local store")
    s3_bucket: str | None = Field(None, description="bucket, required when model_store is s3")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO etc.); unset for AWS"
    )
    s3_region: str = Field("us-east-1", min_length=1, description="S3 region")
    s3_verify_download: bool = Field(
        True, description="read every upload back and hash it, not only HEAD it"
    )

    @field_validator("model_store", mode="before")
    @classmethod
    def _known_store(cls, value: object) -> object:
        if value not in ("local", "s3"):
            raise ValueError(f"TRAINYARD_MODEL_STORE must be 'local' or 's3', not {value!r}")
        return value

    @field_validator("s3_bucket", "s3_endpoint_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `.env.sample` lists these as `TRAINYARD_S3_BUCKET=`: empty means not set.
        return None if value == "" else value

    @field_validator("s3_bucket")
    @classmethod
    def _bucket_name(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET.fullmatch(value):
            raise ValueError(
                f"TRAINYARD_S3_BUCKET {value!r} is not a bucket name "
                "(3-63 lowercase letters, digits, '.' and '-')"
            )
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"TRAINYARD_S3_ENDPOINT_URL {value!r} must be an http(s):// URL")
        return value

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> ModelStoreSettings:
        if self.model_store == "s3" and self.s3_bucket is None:
            raise ValueError("TRAINYARD_S3_BUCKET must be set when TRAINYARD_MODEL_STORE=s3")
        return self


def create_model_store(settings: ModelStoreSettings) -> ModelStore:
    """The store the settings ask for; S3 credentials come from boto3's usual chain."""
    if settings.model_store == "local":
        return LocalModelStore(settings.model_dir)
    if settings.s3_bucket is None:
        raise ValueError("TRAINYARD_S3_BUCKET must be set when TRAINYARD_MODEL_STORE=s3")
    # S3-compatible servers rarely serve bucket subdomains, so address them by path.
    addressing = "path" if settings.s3_endpoint_url else "auto"
    # A session of its own: boto3's default session is shared, and not safe across threads.
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(
            s3={"addressing_style": addressing}, retries={"mode": "standard", "max_attempts": 5}
        ),
    )
    return S3ModelStore(settings.s3_bucket, client, verify_download=settings.s3_verify_download)
