"""Settings come from TRAINYARD_* variables; bad values fail naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from domain.settings import StoreSettings


def test_the_embedded_default_is_sqlite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    env = StoreSettings().eventsourcing_env()
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"
    assert (tmp_path / "var").is_dir()


def test_postgres_is_chosen_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINYARD_EVENT_STORE", "postgres")
    monkeypatch.setenv("TRAINYARD_POSTGRES_SCHEMA", "trainyard")
    env = StoreSettings().eventsourcing_env()
    assert env["PERSISTENCE_MODULE"] == "domain.postgres:StoreFactory"
    assert env["POSTGRES_SCHEMA"] == "trainyard"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TRAINYARD_EVENT_STORE", "mysql"),
        ("TRAINYARD_POSTGRES_PORT", "not-a-port"),
        ("TRAINYARD_POSTGRES_PORT", "70000"),
        ("TRAINYARD_POSTGRES_SCHEMA", "x; DROP TABLE jobs"),
        ("TRAINYARD_MAX_ATTEMPTS", "0"),
    ],
)
def test_a_bad_variable_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        StoreSettings()
    field = variable.removeprefix("TRAINYARD_").lower()
    assert field in str(info.value)


def test_mlagents_learn_runs_from_the_installed_environment() -> None:
    learn = Path(sys.executable).parent / "mlagents-learn"
    result = subprocess.run(
        [str(learn), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--base-port" in result.stdout
