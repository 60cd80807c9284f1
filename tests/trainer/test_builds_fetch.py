"""Uploaded builds on a train node: fetched from the model store, checked, unpacked once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
from faststream import TestApp

from domain.contracts import Dispatch
from domain.job import JobStatus
from domain.spec import EnvRef, parse_job_spec
from tests.conftest import sqlite_settings
from tests.gateway.conftest import start as start_gateway
from tests.trainer.buildarchives import GZIP, Entry, standin_tar_gz, tar_gz
from tests.trainer.conftest import ppo_config

# moto's S3 server and a fresh bucket, as the model store's own tests set them up.
from tests.trainer.test_modelstore import fake_aws_env, moto_endpoint, s3_store  # noqa: F401
from tests.trainer.test_node import installation, model_settings
from trainer.builds import (
    EnvError,
    build_key,
    resolve_env,
    sweep_stale_fetches,
    sweep_unused_builds,
)
from trainer.modelstore import LocalModelStore, ModelStore, ObjectReader, S3ModelStore
from trainer.node import create_app as create_node


def store_archive(store: ModelStore, archive: bytes, tmp: Path) -> str:
    """Put `archive` in the store as the gateway does; return its sha256."""
    sha256 = hashlib.sha256(archive).hexdigest()
    source = tmp / f"{sha256}.upload"
    source.write_bytes(archive)
    store.put_file(build_key(sha256), source)
    return sha256


def hidden(builds_dir: Path) -> list[str]:
    """Temporary files and directories left in the builds directory."""
    return sorted(p.name for p in builds_dir.iterdir() if p.name.startswith("."))


def test_a_build_is_fetched_unpacked_and_runnable(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path / "models")
    sha256 = store_archive(store, standin_tar_gz("reach", tmp_path / "standin"), tmp_path)
    builds = tmp_path / "builds"

    player = resolve_env(EnvRef(sha256=sha256), builds, store)

    assert player == builds / sha256 / "reach"
    assert os.access(player, os.X_OK)
    assert (builds / sha256 / "reach_Data" / "README.txt").read_text() == "stand-in build data\n"
    assert hidden(builds) == []
    # Once there, it is used as it is: the store is not asked again.
    store.delete_prefix("builds")
    assert resolve_env(EnvRef(sha256=sha256), builds, store) == player


def test_leftovers_of_a_fetch_cut_short_are_swept_and_a_fetch_in_progress_is_not(
    tmp_path: Path,
) -> None:
    store = LocalModelStore(tmp_path / "models")
    sha256 = store_archive(store, standin_tar_gz("reach", tmp_path / "standin"), tmp_path)
    builds = tmp_path / "builds"
    player = resolve_env(EnvRef(sha256=sha256), builds, store)
    # What a node killed mid-fetch leaves: a partial archive and a half-unpacked directory.
    crashed_archive = builds / f".{sha256}.k2j4x.archive"
    crashed_archive.write_bytes(b"partial")
    crashed_unpack = builds / f".{sha256}.p9q1z.unpack"
    (crashed_unpack / "reach_Data").mkdir(parents=True)
    two_hours_ago = time.time() - 7200
    for path in (crashed_archive, crashed_unpack):
        os.utime(path, (two_hours_ago, two_hours_ago))
    # Another node sharing the directory, fetching right now.
    in_progress = builds / f".{sha256}.a8b7c.archive"
    in_progress.write_bytes(b"downloading")

    assert sweep_stale_fetches(builds) == 2

    assert hidden(builds) == [in_progress.name]
    assert os.access(player, os.X_OK)  # builds themselves are kept
    assert sweep_stale_fetches(tmp_path / "never-created") == 0


def test_builds_no_run_used_for_the_days_kept_are_deleted_and_fetched_again_when_needed(
    tmp_path: Path,
) -> None:
    store = LocalModelStore(tmp_path / "models")
    old = store_archive(store, standin_tar_gz("reach", tmp_path / "reach"), tmp_path)
    recent = store_archive(store, standin_tar_gz("gridgoal", tmp_path / "gridgoal"), tmp_path)
    builds = tmp_path / "builds"
    for sha256 in (old, recent):
        resolve_env(EnvRef(sha256=sha256), builds, store)
    resolve_env(EnvRef(builtin="reach"), builds, store)
    three_weeks_ago = time.time() - 21 * 86400
    for sha256 in (old, recent):
        os.utime(builds / sha256, (three_weeks_ago, three_weeks_ago))
    resolve_env(EnvRef(sha256=recent), builds, store)  # a run uses it again today

    assert sweep_unused_builds(builds, keep_days=0) == []  # 0 keeps every build
    assert sweep_unused_builds(builds, keep_days=14) == [old]

    assert sorted(p.name for p in builds.iterdir()) == sorted(["builtin", recent])
    # A job that needs the deleted build later fetches it again.
    player = resolve_env(EnvRef(sha256=old), builds, store)
    assert player == builds / old / "reach"
    assert os.access(player, os.X_OK)


def test_a_build_is_fetched_from_s3_and_a_damaged_copy_is_refused(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store: S3ModelStore = request.getfixturevalue("s3_store")
    good = store_archive(store, standin_tar_gz("reach", tmp_path / "standin"), tmp_path)
    damaged = store_archive(store, tar_gz([Entry("Game", b"#!/bin/sh\n", 0o755)]), tmp_path)
    # Other bytes under the same key and metadata, as a faulty store or a bad copy would hold.
    head = store.client.head_object(Bucket=store.bucket, Key=build_key(damaged))
    store.client.put_object(
        Bucket=store.bucket,
        Key=build_key(damaged),
        Body=tar_gz([Entry("Evil", b"#!/bin/sh\n", 0o755)]),
        Metadata=head["Metadata"],
    )
    builds = tmp_path / "builds"

    assert resolve_env(EnvRef(sha256=good), builds, store) == builds / good / "reach"
    with pytest.raises(EnvError) as caught:
        resolve_env(EnvRef(sha256=damaged), builds, store)

    assert str(caught.value).startswith(f"build {damaged}: the model store's copy is damaged")
    assert sorted(p.name for p in builds.iterdir()) == [good]


class RacingStore(LocalModelStore):
    """A local store whose readers all start together, so that fetches overlap."""

    def __init__(self, root: Path, parties: int) -> None:
        super().__init__(root)
        self.barrier = threading.Barrier(parties, timeout=30)

    def open(self, key: str) -> ObjectReader:
        self.barrier.wait()
        return super().open(key)


def test_runs_fetching_the_same_build_at_once_all_get_one_whole_copy(tmp_path: Path) -> None:
    store = RacingStore(tmp_path / "models", parties=3)
    sha256 = store_archive(store, standin_tar_gz("gridgoal", tmp_path / "standin"), tmp_path)
    builds = tmp_path / "builds"

    with ThreadPoolExecutor(3) as pool:
        players = list(
            pool.map(lambda _: resolve_env(EnvRef(sha256=sha256), builds, store), range(3))
        )

    assert players == [builds / sha256 / "gridgoal"] * 3
    assert sorted(p.name for p in (builds / sha256).iterdir()) == ["gridgoal", "gridgoal_Data"]
    assert hidden(builds) == []  # the losing copies were discarded


def test_a_build_missing_from_the_store_is_named(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path / "models")
    sha256 = "ab" * 32
    with pytest.raises(EnvError) as caught:
        resolve_env(EnvRef(sha256=sha256), tmp_path / "builds", store)
    assert (
        str(caught.value) == f"build {sha256} is not on this node and not in the model store"
        f" (no object builds/{sha256})"
    )
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([Entry("Game", b"x", 0o755), Entry("../escape", b"x")], "member '../escape' has '..'"),
        ([Entry("Game", b"x", 0o755), Entry("lib", type=b"2", link="/")], "symbolic link"),
        ([Entry("Game", b"x", 0o644)], "no player at the top level"),
    ],
)
def test_a_bad_archive_in_the_store_is_refused_and_leaves_nothing(
    tmp_path: Path, entries: list[Entry], reason: str
) -> None:
    """The node applies the rules itself: the store may hold what the gateway never checked."""
    store = LocalModelStore(tmp_path / "models")
    sha256 = store_archive(store, tar_gz(entries), tmp_path)
    builds = tmp_path / "builds"

    with pytest.raises(EnvError) as caught:
        resolve_env(EnvRef(sha256=sha256), builds, store)

    assert str(caught.value).startswith(f"build {sha256} cannot be unpacked: ")
    assert reason in str(caught.value)
    assert list(builds.iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_an_archive_stored_under_another_hash_is_refused(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path / "models")
    archive = tar_gz([Entry("Game", b"x", 0o755)])
    wrong = "cd" * 32
    (tmp_path / "upload").write_bytes(archive)
    store.put_file(build_key(wrong), tmp_path / "upload")

    with pytest.raises(EnvError) as caught:
        resolve_env(EnvRef(sha256=wrong), tmp_path / "builds", store)

    actual = hashlib.sha256(archive).hexdigest()
    assert (
        str(caught.value) == f"build {wrong}: the model store holds an archive with sha256 {actual}"
    )
    assert list((tmp_path / "builds").iterdir()) == []


# --- through the gateway and the train node daemon ------------------------------------------


@pytest.mark.slow
async def test_an_uploaded_build_trains_on_a_node_and_a_missing_one_fails_the_job(
    tmp_path: Path,
) -> None:
    archive = standin_tar_gz("reach", tmp_path / "standin")
    missing = "ef" * 32
    async with installation(tmp_path) as setup:
        # The gateway on the installation's event store and model store (tmp_path/models).
        with start_gateway(sqlite_settings(tmp_path), tmp_path) as gateway:

            def upload_and_submit() -> tuple[str, str]:
                with gateway.client("client-1") as http:
                    uploaded = http.post("/builds", content=archive, headers={"Content-Type": GZIP})
                    assert uploaded.status_code == 201, uploaded.text
                    sha256 = uploaded.json()["sha256"]
                    body = {
                        "config": ppo_config("Reach", 1000, summary_freq=500),
                        "env": {"sha256": sha256},
                        "seed": 3,
                    }
                    submitted = http.post("/jobs", json=body)
                    assert submitted.status_code == 201, submitted.text
                    # A build never uploaded is refused at once, naming the field.
                    refused = http.post("/jobs", json=body | {"env": {"sha256": missing}})
                    assert refused.status_code == 422, refused.text
                    assert refused.json()["errors"][0]["field"] == "env.sha256"
                return sha256, submitted.json()["job_id"]

            sha256, good_id = await asyncio.to_thread(upload_and_submit)
        # A job whose build the store no longer has (deleted after it was accepted) fails.
        spec = parse_job_spec(
            {"config": ppo_config("Reach", 1000, summary_freq=500), "env": {"sha256": missing}}
        )
        missing_id = str(await asyncio.to_thread(setup.jobs.submit, spec, "client-1"))

        assert sha256 == hashlib.sha256(archive).hexdigest()
        async with TestApp(create_node(setup.node, model_settings(setup))):
            jobs = []
            for text in (good_id, missing_id):
                job = await setup.job(uuid.UUID(text))
                jobs.append(job)
                await setup.dispatch(Dispatch(job_id=job.id, attempt=1, spec=job.spec))
            good, failed = [
                await setup.wait_job(job.id, lambda j: j.status.is_terminal, "the job to end")
                for job in jobs
            ]

        assert good.status is JobStatus.COMPLETED, good.reason
        assert good.model_key is not None
        with setup.models.open(good.model_key) as reader:
            onnx.checker.check_model(onnx.load_from_string(reader.read()))
        player = setup.node.builds_dir / sha256 / "reach"
        assert os.access(player, os.X_OK)

        assert failed.status is JobStatus.FAILED
        assert failed.reason is not None
        assert f"build {missing} is not on this node and not in the model store" in failed.reason
        assert not (setup.node.builds_dir / missing).exists()
        assert setup.leftovers() == []
