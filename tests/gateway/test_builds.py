"""Build uploads through the real gateway: stored by sha256 once, hostile archives refused."""

from __future__ import annotations

import gzip
import hashlib
import random
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import postgres_settings
from tests.gateway.conftest import CONFIG, Gateway, start
from tests.trainer.buildarchives import GZIP, ZIP, Entry, standin_tar_gz, tar_gz, zip_archive
from trainer.builds import build_key

PLAYER = Entry("Game.x86_64", b"#!/bin/sh\nexit 0\n", 0o755)


def stored_builds(gateway: Gateway) -> list[str]:
    """The names of the build archives in the model store."""
    directory = gateway.models.root / "builds"
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_a_build_is_stored_by_sha256_once_and_can_be_looked_up(
    gateway: Gateway, tmp_path: Path
) -> None:
    archive = standin_tar_gz("reach", tmp_path / "standin")
    sha256 = hashlib.sha256(archive).hexdigest()
    with gateway.client("client-a") as http:
        first = http.post("/builds", content=archive, headers={"Content-Type": GZIP})
        assert first.status_code == 201, first.text
        assert first.json() == {"sha256": sha256, "size": len(archive)}
        assert first.headers["Location"] == f"/builds/{sha256}"
        stored_file = gateway.models.root / build_key(sha256)
        before = stored_file.stat()

        again = http.post("/builds", content=archive, headers={"Content-Type": GZIP})
        looked_up = http.get(f"/builds/{sha256}")
        # Another client's build does not exist for it, until it uploads the same bytes.
        with gateway.client("client-b") as other:
            unseen = other.get(f"/builds/{sha256}")
            theirs_too = other.post("/builds", content=archive, headers={"Content-Type": GZIP})
            seen = other.get(f"/builds/{sha256}")

    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert unseen.status_code == 404
    assert theirs_too.status_code == 200, theirs_too.text
    after = stored_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    for found in (looked_up, seen):
        assert found.status_code == 200
        assert found.json() == {"sha256": sha256, "size": len(archive)}
    with gateway.models.open(build_key(sha256)) as reader:
        assert reader.read() == archive


def test_a_job_may_name_only_a_build_its_client_uploaded(gateway: Gateway, tmp_path: Path) -> None:
    archive = standin_tar_gz("reach", tmp_path / "standin")
    sha256 = hashlib.sha256(archive).hexdigest()
    body: dict[str, Any] = {"config": CONFIG, "env": {"sha256": sha256}}
    with gateway.client("client-a") as http:
        before_upload = http.post("/jobs", json=body)
        uploaded = http.post("/builds", content=archive, headers={"Content-Type": GZIP})
        accepted = http.post("/jobs", json=body)
    with gateway.client("client-b") as other:
        someone_elses = other.post("/jobs", json=body)

    assert uploaded.status_code == 201, uploaded.text
    assert accepted.status_code == 201, accepted.text
    for refused in (before_upload, someone_elses):
        assert refused.status_code == 422, refused.text
        (error,) = refused.json()["errors"]
        assert error["field"] == "env.sha256"
        assert "POST /builds" in error["reason"]
    # Nothing was recorded for the refused submissions.
    with gateway.client("client-b") as other:
        assert other.get("/jobs").json()["jobs"] == []


def test_a_zip_made_on_windows_is_accepted_by_its_player_name(gateway: Gateway) -> None:
    archive = zip_archive(
        {"Game.x86_64": b"\x7fELF...", "UnityPlayer.so": b"lib", "Game_Data/level0": b"x"}
    )
    with gateway.client("client-a") as http:
        response = http.post("/builds", content=archive, headers={"Content-Type": ZIP})
    assert response.status_code == 201, response.text
    assert stored_builds(gateway) == [hashlib.sha256(archive).hexdigest()]


@pytest.fixture
def small_unpacked_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds may unpack to at most 1 MB (read when the first upload arrives)."""
    monkeypatch.setenv("TRAINYARD_BUILD_UNPACKED_LIMIT_BYTES", str(1_000_000))


HOSTILE: dict[str, tuple[bytes, str, str]] = {
    # case: (body, Content-Type, what the 422 says)
    "path traversal": (
        tar_gz([PLAYER, Entry("../../etc/cron.d/evil", b"* * * * * root sh")]),
        GZIP,
        "member '../../etc/cron.d/evil' has '..' in its path",
    ),
    "absolute path": (
        tar_gz([PLAYER, Entry("/etc/evil", b"x")]),
        GZIP,
        "member '/etc/evil' has an absolute path",
    ),
    "symlink": (
        tar_gz([PLAYER, Entry("data", type=tarfile.SYMTYPE, link="/etc")]),
        GZIP,
        "member 'data' is a symbolic link",
    ),
    "hard link": (
        tar_gz([PLAYER, Entry("passwd", type=tarfile.LNKTYPE, link="/etc/passwd")]),
        GZIP,
        "member 'passwd' is a hard link",
    ),
    "device": (
        tar_gz([PLAYER, Entry("disk", type=tarfile.BLKTYPE)]),
        GZIP,
        "member 'disk' is a device",
    ),
    "zip symlink": (
        zip_archive(
            {"Game.x86_64": b"x", "data": b"/etc"}, unix_modes={"data": stat.S_IFLNK | 0o777}
        ),
        ZIP,
        "member 'data' is a symbolic link",
    ),
    "too big unpacked": (
        # 2 MB of zeros compress to a few kB.
        tar_gz([PLAYER, Entry("Game_Data/zeros", bytes(2_000_000))]),
        GZIP,
        "the archive unpacks to more than 1000000 bytes",
    ),
    "zip too big unpacked": (
        zip_archive({"Game.x86_64": b"x", "Game_Data/zeros": bytes(2_000_000)}),
        ZIP,
        "the archive unpacks to more than 1000000 bytes",
    ),
    "zip path traversal": (
        zip_archive({"Game.x86_64": b"x", "../evil.sh": b"x"}),
        ZIP,
        "member '../evil.sh' has '..' in its path",
    ),
    "no executable": (
        tar_gz([Entry("Game", b"x", 0o644), Entry("notes.txt", b"x")]),
        GZIP,
        "no player at the top level",
    ),
    "executable only in a subdirectory": (
        tar_gz([Entry("bin", None, 0o755), Entry("bin/Game", b"x", 0o755)]),
        GZIP,
        "no player at the top level",
    ),
    "two executables": (
        tar_gz([PLAYER, Entry("Other", b"x", 0o755)]),
        GZIP,
        "several possible players at the top level: Game.x86_64, Other",
    ),
    "not an archive": (b"MZ\x90\x00 a Windows program", GZIP, "not a .tar.gz or .zip archive"),
    "empty body": (b"", GZIP, "the archive is empty"),
    "gzip but not tar": (
        gzip.compress(b"just text\n" * 100),
        GZIP,
        "not a readable tar.gz archive",
    ),
    "truncated": (tar_gz([PLAYER])[:40], GZIP, "not a readable tar.gz archive"),
    "zip sent as gzip": (
        zip_archive({"Game.x86_64": b"x"}),
        GZIP,
        "the Content-Type announces a gzip-compressed tar archive (.tar.gz), the body is a zip",
    ),
}


@pytest.mark.usefixtures("small_unpacked_limit")
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_or_broken_archive_is_refused_with_its_reason(
    gateway: Gateway, case: str
) -> None:
    body, content_type, reason = HOSTILE[case]
    with gateway.client("client-a") as http:
        response = http.post("/builds", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("the build archive is refused: ")
    assert reason in detail
    assert response.json()["errors"][0]["field"] == "body"
    assert stored_builds(gateway) == []


def test_uploads_past_the_size_limit_are_refused_with_413(
    pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read when the gateway starts.
    monkeypatch.setenv("TRAINYARD_BUILD_LIMIT_BYTES", "4096")
    with start(postgres_settings(pg_schema), tmp_path) as gateway:
        refuses_uploads_past_4096_bytes(gateway)


def refuses_uploads_past_4096_bytes(gateway: Gateway) -> None:
    archive = tar_gz([PLAYER, Entry("noise", random.Random(1).randbytes(10_000))])
    assert len(archive) > 4096

    def chunks() -> Iterator[bytes]:
        yield from (archive[i : i + 1000] for i in range(0, len(archive), 1000))

    with gateway.client("client-a") as http:
        declared = http.post("/builds", content=archive, headers={"Content-Type": GZIP})
        # Without Content-Length (chunked), the body is counted as it arrives.
        streamed = http.post("/builds", content=chunks(), headers={"Content-Type": GZIP})
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["detail"] == "the build is larger than the limit of 4096 bytes"
    assert stored_builds(gateway) == []


def test_other_content_types_are_refused_with_415(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        response = http.post(
            "/builds", content=tar_gz([PLAYER]), headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 415
    assert "application/gzip" in response.json()["detail"]


def test_uploads_need_a_token_and_unknown_builds_are_404(gateway: Gateway) -> None:
    with gateway.client() as anonymous:
        response = anonymous.post(
            "/builds", content=tar_gz([PLAYER]), headers={"Content-Type": GZIP}
        )
    assert response.status_code == 401
    with gateway.client("client-a") as http:
        unknown = http.get(f"/builds/{'ab' * 32}")
        malformed = http.get("/builds/../../etc")
        upper = http.get(f"/builds/{'AB' * 32}")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "no such build"
    assert malformed.status_code == 404
    assert upper.status_code == 404
    assert stored_builds(gateway) == []
