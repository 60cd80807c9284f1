"""The model store: the same behaviour from a local directory and from S3 (moto's server)."""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from moto.server import ThreadedMotoServer
from pydantic import ValidationError

from trainer.modelstore import (
    MAX_KEY_LENGTH,
    IntegrityError,
    LocalModelStore,
    ModelStore,
    ModelStoreError,
    ModelStoreSettings,
    ObjectNotFoundError,
    S3ModelStore,
    create_model_store,
    model_key,
    verify,
)

MB = 1024 * 1024
JOB = uuid.UUID("6f1c1a4e-8a53-4a43-9d1e-0d4b7c1e2f30")
BAD_KEYS = [
    "../x",
    "jobs/../../x",
    "/abs",
    "a\\b",
    "",
    "a" * (MAX_KEY_LENGTH + 1),
    "jobs//x",
    "jobs/./x",
    "jobs/x/",
    "jobs/.hidden",
    "jobs/sp ace",
]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 HTTP API on a free loopback port, for this module's tests."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def fake_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials for moto through boto3's normal chain, and no user AWS config."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Backend:
    """A store under test, and a way to change its bytes behind its back."""

    store: ModelStore
    corrupt: Callable[[str, bytes], None]
    all_names: Callable[[], list[str]]


def local_backend(root: Path) -> Backend:
    """A LocalModelStore in `root`."""
    store = LocalModelStore(root)

    def corrupt(key: str, data: bytes) -> None:
        with (root / key).open("r+b") as file:
            file.write(data)

    def all_names() -> list[str]:
        # Every file, hidden temporary and sidecar files included.
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    return Backend(store, corrupt, all_names)


@pytest.fixture
def s3_store(moto_endpoint: str, fake_aws_env: None) -> Iterator[S3ModelStore]:
    """An S3ModelStore built by the factory, on a fresh bucket, emptied and deleted afterwards."""
    bucket = f"trainyard-test-{uuid.uuid4().hex[:12]}"
    settings = ModelStoreSettings(
        _env_file=None, model_store="s3", s3_bucket=bucket, s3_endpoint_url=moto_endpoint
    )
    store = create_model_store(settings)
    assert isinstance(store, S3ModelStore)
    # Small parts, so that the 12 MB test goes up in three parts (S3's minimum part is 5 MB).
    store.transfer_config = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
    store.client.create_bucket(Bucket=bucket)
    try:
        yield store
    finally:
        # moto keeps buckets in this process's memory after its server stops.
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                store.client.delete_object(Bucket=bucket, Key=item["Key"])
        store.client.delete_bucket(Bucket=bucket)
        store.client.close()


def s3_backend(store: S3ModelStore) -> Backend:
    """The S3 store, corrupted by rewriting an object with its old metadata."""

    def corrupt(key: str, data: bytes) -> None:
        head = store.client.head_object(Bucket=store.bucket, Key=key)
        store.client.put_object(Bucket=store.bucket, Key=key, Body=data, Metadata=head["Metadata"])

    def all_names() -> list[str]:
        response = store.client.list_objects_v2(Bucket=store.bucket)
        return sorted(item["Key"] for item in response.get("Contents", []))

    return Backend(store, corrupt, all_names)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each test using this runs against the local store and against S3."""
    if request.param == "local":
        return local_backend(tmp_path / "models")
    return s3_backend(request.getfixturevalue("s3_store"))


def write_file(path: Path, data: bytes) -> Path:
    """Write `data` to `path` and return it."""
    path.write_bytes(data)
    return path


def test_small_file_round_trips_with_its_sha256(backend: Backend, tmp_path: Path) -> None:
    data = b"onnx model bytes\x00\xff" * 10
    key = model_key(JOB, 1, "Walker.onnx")
    stored = backend.store.put_file(key, write_file(tmp_path / "Walker.onnx", data))

    sha256 = hashlib.sha256(data).hexdigest()
    assert (stored.key, stored.size, stored.sha256) == (key, len(data), sha256)
    assert backend.store.stat(key) == stored
    with backend.store.open(key) as reader:
        assert reader.info == stored
        assert reader.read() == data
    assert verify(backend.store, key, sha256)


def test_multi_megabyte_file_streams_back_in_chunks(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(12 * MB)
    key = model_key(JOB, 2, "checkpoint.pt")
    stored = backend.store.put_file(key, write_file(tmp_path / "checkpoint.pt", data))

    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.size == len(data)
    with backend.store.open(key) as reader:
        chunks = list(reader)
    assert len(chunks) > 1
    assert max(len(chunk) for chunk in chunks) < len(data)
    assert b"".join(chunks) == data
    if isinstance(backend.store, S3ModelStore):
        head = backend.store.client.head_object(Bucket=backend.store.bucket, Key=key)
        assert head["ETag"].strip('"').endswith("-3"), "uploaded in three parts"


def test_missing_key_has_no_stat_and_cannot_be_opened(backend: Backend) -> None:
    key = model_key(JOB, 1, "missing.onnx")
    assert backend.store.stat(key) is None
    with pytest.raises(ObjectNotFoundError):
        backend.store.open(key)
    assert not verify(backend.store, key, "0" * 64)


def test_a_directory_like_prefix_is_not_an_object(backend: Backend, tmp_path: Path) -> None:
    backend.store.put_file(model_key(JOB, 1, "a.onnx"), write_file(tmp_path / "a", b"a"))
    assert backend.store.stat(f"jobs/{JOB}/attempt-1") is None
    with pytest.raises(ObjectNotFoundError):
        backend.store.open(f"jobs/{JOB}")


def test_keys_are_namespaced_by_job_and_attempt(backend: Backend, tmp_path: Path) -> None:
    other_job = uuid.uuid4()
    assert model_key(JOB, 3, "Walker.onnx") == f"jobs/{JOB}/attempt-3/Walker.onnx"
    keys = {
        (job, attempt): model_key(job, attempt, "Walker.onnx")
        for job in (JOB, other_job)
        for attempt in (1, 10)
    }
    assert len(set(keys.values())) == 4
    for (job, attempt), key in keys.items():
        source = write_file(tmp_path / "model.onnx", f"{job} {attempt}".encode())
        backend.store.put_file(key, source)
    for (job, attempt), key in keys.items():
        with backend.store.open(key) as reader:
            assert reader.read() == f"{job} {attempt}".encode()

    # attempt-1's prefix must not reach attempt-10's objects.
    assert backend.store.delete_prefix(f"jobs/{JOB}/attempt-1") == 1
    assert backend.store.stat(keys[JOB, 1]) is None
    assert backend.store.stat(keys[JOB, 10]) is not None
    assert backend.store.delete_prefix(f"jobs/{other_job}/") == 2
    assert backend.store.stat(keys[other_job, 1]) is None
    assert backend.store.stat(keys[other_job, 10]) is None
    assert backend.store.delete_prefix("jobs/nothing-here") == 0


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda key: repr(key)[:20])
def test_bad_keys_are_rejected(backend: Backend, tmp_path: Path, key: str) -> None:
    source = write_file(tmp_path / "model.onnx", b"model")
    with pytest.raises(ValueError, match="model store key"):
        backend.store.put_file(key, source)
    with pytest.raises(ValueError, match="model store key"):
        backend.store.stat(key)
    with pytest.raises(ValueError, match="model store key"):
        backend.store.open(key)
    assert backend.all_names() == []


@pytest.mark.parametrize(
    ("attempt", "filename"), [(0, "model.onnx"), (1, "a/b.onnx"), (1, ".."), (1, "")]
)
def test_model_key_rejects_bad_parts(attempt: int, filename: str) -> None:
    with pytest.raises(ValueError, match=r"attempt|filename|model store key"):
        model_key(JOB, attempt, filename)


def test_verify_detects_a_corrupted_object(backend: Backend, tmp_path: Path) -> None:
    data = b"the trained policy" * 1000
    key = model_key(JOB, 1, "Walker.onnx")
    stored = backend.store.put_file(key, write_file(tmp_path / "Walker.onnx", data))
    assert verify(backend.store, key, stored.sha256)
    assert not verify(backend.store, key, hashlib.sha256(b"other").hexdigest())

    backend.corrupt(key, b"X" * 16)  # same length, different bytes

    assert not verify(backend.store, key, stored.sha256)
    with backend.store.open(key) as reader, pytest.raises(IntegrityError, match=stored.sha256):
        reader.read()


def test_put_replaces_an_existing_object(backend: Backend, tmp_path: Path) -> None:
    key = model_key(JOB, 1, "Walker.onnx")
    backend.store.put_file(key, write_file(tmp_path / "first", b"first"))
    second = backend.store.put_file(key, write_file(tmp_path / "second", b"second version"))
    assert backend.store.stat(key) == second
    with backend.store.open(key) as reader:
        assert reader.read() == b"second version"


def test_missing_source_fails_and_stores_nothing(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        backend.store.put_file(model_key(JOB, 1, "Walker.onnx"), tmp_path / "not-there.onnx")
    assert backend.all_names() == []


def test_local_store_leaves_old_object_and_no_temp_file_after_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "models"
    store = LocalModelStore(root)
    key = model_key(JOB, 1, "Walker.onnx")
    old = store.put_file(key, write_file(tmp_path / "old", b"old model"))
    names_before = sorted(p.name for p in root.rglob("*"))

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # A full disk cannot be arranged here; fsync is where it would show up.
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.put_file(key, write_file(tmp_path / "new", b"new model, never stored"))
    monkeypatch.undo()

    assert sorted(p.name for p in root.rglob("*")) == names_before
    assert store.stat(key) == old
    assert verify(store, key, old.sha256)


def test_local_store_never_writes_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "models"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "jobs").symlink_to(outside, target_is_directory=True)
    store = LocalModelStore(root)
    source = write_file(tmp_path / "model.onnx", b"model")

    with pytest.raises(ValueError, match="outside"):
        store.put_file(model_key(JOB, 1, "model.onnx"), source)
    with pytest.raises(ValueError, match="outside"):
        store.stat(model_key(JOB, 1, "model.onnx"))
    assert list(outside.iterdir()) == []


def test_local_store_without_sidecar_hashes_the_file(tmp_path: Path) -> None:
    # What a crash between the data rename and the sidecar write leaves behind.
    store = LocalModelStore(tmp_path / "models")
    key = model_key(JOB, 1, "Walker.onnx")
    stored = store.put_file(key, write_file(tmp_path / "m", b"model bytes"))
    for sidecar in (tmp_path / "models").rglob(".*.sha256"):
        sidecar.unlink()
    assert store.stat(key) == stored
    assert verify(store, key, stored.sha256)


def test_s3_object_carries_sha256_metadata(s3_store: S3ModelStore, tmp_path: Path) -> None:
    key = model_key(JOB, 1, "Walker.onnx")
    stored = s3_store.put_file(key, write_file(tmp_path / "m", b"model bytes"))
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=key)
    assert head["Metadata"] == {"sha256": stored.sha256}
    assert head["ContentLength"] == stored.size


def test_s3_object_without_sha256_metadata_is_an_error(s3_store: S3ModelStore) -> None:
    key = model_key(JOB, 1, "foreign.onnx")
    s3_store.client.put_object(Bucket=s3_store.bucket, Key=key, Body=b"not ours")
    with pytest.raises(ModelStoreError, match="x-amz-meta-sha256"):
        s3_store.stat(key)


def test_s3_upload_to_a_missing_bucket_fails_clearly(
    s3_store: S3ModelStore, tmp_path: Path
) -> None:
    store = S3ModelStore("no-such-bucket-here", s3_store.client)
    with pytest.raises(ModelStoreError, match=r"s3://no-such-bucket-here/jobs/.*upload failed"):
        store.put_file(model_key(JOB, 1, "m.onnx"), write_file(tmp_path / "m", b"m"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TRAINYARD_* model store variables from the outer environment."""
    for name in ModelStoreSettings.model_fields:
        monkeypatch.delenv(f"TRAINYARD_{name.upper()}", raising=False)
    return monkeypatch


def test_settings_default_to_a_local_store(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert ModelStoreSettings(_env_file=None).model_dir == Path("var/models")
    clean_env.setenv("TRAINYARD_MODEL_DIR", str(tmp_path / "m"))
    store = create_model_store(ModelStoreSettings(_env_file=None))
    assert isinstance(store, LocalModelStore)
    stored = store.put_file("a/b.onnx", write_file(tmp_path / "b", b"b"))
    assert (tmp_path / "m" / "a" / "b.onnx").read_bytes() == b"b"
    assert stored.size == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRAINYARD_MODEL_STORE": "s3"}, "TRAINYARD_S3_BUCKET must be set"),
        ({"TRAINYARD_MODEL_STORE": "s3", "TRAINYARD_S3_BUCKET": ""}, "TRAINYARD_S3_BUCKET"),
        ({"TRAINYARD_MODEL_STORE": "gcs"}, "TRAINYARD_MODEL_STORE must be 'local' or 's3'"),
        ({"TRAINYARD_S3_BUCKET": "Bad_Bucket"}, "TRAINYARD_S3_BUCKET 'Bad_Bucket'"),
        ({"TRAINYARD_S3_ENDPOINT_URL": "minio:9000"}, "TRAINYARD_S3_ENDPOINT_URL"),
    ],
)
def test_bad_settings_name_the_variable(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        ModelStoreSettings(_env_file=None)
