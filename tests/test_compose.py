"""docker-compose.yml, the Dockerfile and .env.sample agree with the code they configure.

No Docker engine runs here, so the files are checked against the code: every command starts an
entry point that exists, every TRAINYARD_* variable is a setting of the process that gets it and
parses, every URL names a service of the file on its port with its credentials, and
`.env.sample` lists every setting with its default and its meaning.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from cli.local import LocalSettings
from cli.preflight import PROCESS_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
TRAINYARD_IMAGE = "trainyard:latest"
ENTRY_POINTS = {  # the app each process serves -> its settings in PROCESS_SETTINGS
    "gateway.app:app": "gateway",
    "handlers.app:app": "handlers",
    "projections": "projections",
    "trainer.node:app": "train-node",
}
STORES = {  # service -> (image prefix, port)
    "postgres": ("postgres:", 5432),
    "rabbitmq": ("rabbitmq:", 5672),
    "redis": ("redis:", 6379),
    "minio": ("minio/minio", 9000),
}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """A compose value as `docker compose` sees it with no variable set: `${X:-d}` -> `d`."""
    if re.search(r"(?<!\$)\$(?!\$|\{)", value):
        pytest.fail(f"{value!r}: write variables as ${{NAME:-default}}")
    return _VARIABLE.sub(lambda m: m["default"] or "", value).replace("$$", "$")


def environment(service: str) -> dict[str, str]:
    """The service's environment, interpolated."""
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), f"{service}: write environment as a mapping"
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def command(service: str) -> list[str]:
    """The service's command as an argument list."""
    value = SERVICES[service]["command"]
    assert isinstance(value, list), f"{service}: write the command as a list"
    return [interpolate(str(arg)) for arg in value]


def trainyard_services() -> list[str]:
    """Services that run the Trainyard image."""
    return [name for name, svc in SERVICES.items() if svc.get("image") == TRAINYARD_IMAGE]


def process_of(service: str) -> str:
    """Which Trainyard process the service runs, from its command."""
    args = command(service)
    if args[:3] == ["python", "-m", "projections"]:
        return ENTRY_POINTS["projections"]
    for arg in args:
        if arg in ENTRY_POINTS:
            return ENTRY_POINTS[arg]
    pytest.fail(f"{service}: {args} runs no known Trainyard process")


def settings_classes() -> list[type[BaseSettings]]:
    """Every settings class of every process, and local mode's."""
    classes = [cls for group in PROCESS_SETTINGS.values() for cls in group]
    return list(dict.fromkeys([*classes, LocalSettings]))


def variables(classes: list[type[BaseSettings]]) -> dict[str, list[type[BaseSettings]]]:
    """TRAINYARD_* name -> the classes with that field."""
    found: dict[str, list[type[BaseSettings]]] = {}
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name in cls.model_fields:
            found.setdefault(f"{prefix}{name}".upper(), []).append(cls)
    return found


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No TRAINYARD_* variable and no .env file in the way."""
    for key in list(os.environ):
        if key.startswith("TRAINYARD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


# --- docker-compose.yml -----------------------------------------------------------------------


def test_the_central_processes_and_a_scalable_trainer_run_from_one_image() -> None:
    assert {process_of(s) for s in trainyard_services()} == set(PROCESS_SETTINGS)
    assert {"gateway", "handlers", "projections", "trainer"} <= set(trainyard_services())
    assert process_of("trainer") == "train-node"
    trainer = SERVICES["trainer"]
    # `docker compose up --scale trainer=3`: nothing that two replicas could not share.
    assert "container_name" not in trainer
    assert "ports" not in trainer
    assert "hostname" not in trainer
    assert "TRAINYARD_NODE_ID" not in environment("trainer")  # the container's host name
    for service in trainyard_services():
        assert "build" in SERVICES[service], service


@pytest.mark.parametrize("service", trainyard_services())
def test_each_command_starts_an_entry_point_that_exists(service: str) -> None:
    args = command(service)
    program = args[0]
    bin_dir = Path(sys.executable).parent
    if program == "python":
        assert args[1] == "-m"
        assert importlib.util.find_spec(f"{args[2]}.__main__") is not None, args
        return
    assert (bin_dir / program).is_file(), f"{program} is not installed"
    target = next(arg for arg in args[1:] if ":" in arg and not arg.startswith("-"))
    module, attribute = target.split(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{service}: no module {module}"
    assert spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    assigned = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    assert attribute in assigned, f"{service}: {module} has no top-level {attribute}"


@pytest.mark.parametrize("service", trainyard_services())
def test_each_trainyard_variable_is_a_setting_of_that_process_and_parses(
    service: str, clean_env: pytest.MonkeyPatch
) -> None:
    classes = list(PROCESS_SETTINGS[process_of(service)])
    known = variables(classes)
    env = {k: v for k, v in environment(service).items() if k.startswith("TRAINYARD_")}
    unknown = sorted(set(env) - set(known))
    assert unknown == [], f"{service}: not settings of {[c.__name__ for c in classes]}"
    for key, value in env.items():
        clean_env.setenv(key, value)
    for cls in classes:
        cls(_env_file=None)  # raises if a value does not parse


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None, url
    assert parts.port is not None, f"{url}: name the port"
    return parts.hostname, parts.port


def test_urls_name_services_of_this_file_on_their_ports_with_their_credentials() -> None:
    rabbit, postgres, minio = (environment(s) for s in ("rabbitmq", "postgres", "minio"))
    checked = set()
    for service in trainyard_services():
        env = environment(service)
        if "TRAINYARD_AMQP_URL" in env:
            url = urlsplit(env["TRAINYARD_AMQP_URL"])
            assert _host_port(env["TRAINYARD_AMQP_URL"]) == ("rabbitmq", 5672)
            assert (url.username, url.password) == (
                rabbit["RABBITMQ_DEFAULT_USER"],
                rabbit["RABBITMQ_DEFAULT_PASS"],
            )
            checked.add("rabbitmq")
        if "TRAINYARD_REDIS_URL" in env:
            assert _host_port(env["TRAINYARD_REDIS_URL"]) == ("redis", 6379)
            checked.add("redis")
        if env.get("TRAINYARD_EVENT_STORE") == "postgres":
            assert env["TRAINYARD_POSTGRES_HOST"] == "postgres"
            assert env.get("TRAINYARD_POSTGRES_PORT", "5432") == "5432"
            assert env["TRAINYARD_POSTGRES_DBNAME"] == postgres["POSTGRES_DB"]
            assert env["TRAINYARD_POSTGRES_USER"] == postgres["POSTGRES_USER"]
            assert env["TRAINYARD_POSTGRES_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
            checked.add("postgres")
        if env.get("TRAINYARD_MODEL_STORE") == "s3":
            assert _host_port(env["TRAINYARD_S3_ENDPOINT_URL"]) == ("minio", 9000)
            assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
            assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
            assert env["TRAINYARD_S3_BUCKET"] in " ".join(command("minio-init"))
            checked.add("minio")
    assert checked == set(STORES)
    for name, (image, _port) in STORES.items():
        assert SERVICES[name]["image"].startswith(image), name


def test_every_process_shares_one_event_store_broker_redis_and_model_store() -> None:
    for key in ("TRAINYARD_AMQP_URL", "TRAINYARD_REDIS_URL", "TRAINYARD_S3_BUCKET"):
        values = {environment(s).get(key) for s in trainyard_services()} - {None}
        assert len(values) == 1, f"{key}: {values}"
    stores = {environment(s).get("TRAINYARD_POSTGRES_HOST") for s in trainyard_services()}
    assert stores - {None} == {"postgres"}
    for service in trainyard_services():
        env = environment(service)
        # The same prefixes everywhere, or processes would not find each other's queues and keys.
        assert "TRAINYARD_QUEUE_PREFIX" not in env
        assert "TRAINYARD_REDIS_KEY_PREFIX" not in env
        if process_of(service) in ("gateway", "train-node"):
            assert env["TRAINYARD_MODEL_STORE"] == "s3", service


def test_each_service_waits_for_what_it_connects_to() -> None:
    for service in trainyard_services():
        env = environment(service)
        needs = set()
        if "TRAINYARD_AMQP_URL" in env:
            needs.add("rabbitmq")
        if "TRAINYARD_REDIS_URL" in env:
            needs.add("redis")
        if env.get("TRAINYARD_EVENT_STORE") == "postgres":
            needs.add("postgres")
        if env.get("TRAINYARD_MODEL_STORE") == "s3":
            needs.add("minio-init")
        depends = SERVICES[service].get("depends_on", {})
        assert isinstance(depends, dict), f"{service}: give depends_on conditions"
        for need in needs:
            if need == "minio-init":
                condition = "service_completed_successfully"
            else:
                condition = "service_healthy"
                assert "healthcheck" in SERVICES[need], need
            assert depends.get(need, {}).get("condition") == condition, (service, need)
    # The event store's tables are created once, by the projections, before anyone else starts.
    for service in ("gateway", "handlers"):
        assert SERVICES[service]["depends_on"]["projections"]["condition"] == "service_healthy"
    assert SERVICES["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def _python_snippets() -> Iterator[tuple[str, str]]:
    for name, service in SERVICES.items():
        test = service.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            yield name, test[3]


@pytest.mark.parametrize(("service", "code"), list(_python_snippets()))
def test_python_healthchecks_compile_and_import_what_exists(service: str, code: str) -> None:
    tree = ast.parse(interpolate(code))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{service}: {node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert importlib.util.find_spec(alias.name) is not None, alias.name


def test_the_gateway_publishes_the_port_uvicorn_listens_on() -> None:
    args = command("gateway")
    port = args[args.index("--port") + 1]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    published = [interpolate(str(p)) for p in SERVICES["gateway"]["ports"]]
    assert [p.rsplit(":", 1)[1] for p in published] == [port]
    health = " ".join(SERVICES["gateway"]["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in health


def test_the_uis_and_stores_are_published_and_pgadmin_knows_the_database() -> None:
    def container_ports(service: str) -> set[int]:
        return {int(interpolate(str(p)).rsplit(":", 1)[1]) for p in SERVICES[service]["ports"]}

    assert {5672, 15672} <= container_ports("rabbitmq")
    assert SERVICES["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert {9000, 9001} <= container_ports("minio")
    assert 6379 in container_ports("redis")
    assert 80 in container_ports("pgadmin")
    servers = json.loads(COMPOSE["configs"]["pgadmin-servers"]["content"])["Servers"]
    (server,) = servers.values()
    postgres = environment("postgres")
    assert (server["Host"], server["Port"]) == ("postgres", 5432)
    assert server["Username"] == postgres["POSTGRES_USER"]
    assert server["MaintenanceDB"] == postgres["POSTGRES_DB"]


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            found.append((instruction.upper(), args.strip()))
    return found


def test_the_dockerfile_copies_files_that_exist_and_every_package() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    copied: list[str] = []
    for instruction, args in instructions:
        if instruction == "COPY":
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                copied.append(source.rstrip("/"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"^include = \[(.*)\]$", pyproject, re.MULTILINE)
    assert include is not None
    for pattern in re.findall(r'"([a-z_]+)\*"', include[1]):
        assert pattern in copied, f"the image lacks the {pattern} package"
    run = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert "--no-deps --ignore-requires-python -r" in run
    assert "https://download.pytorch.org/whl/cpu" in run
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users
    assert users[-1] not in ("root", "0")


def test_the_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".env", ".venv", ".git", "var", ".trainyard"):
        assert entry in ignored, entry


# --- .env.sample --------------------------------------------------------------------------------


def sample() -> tuple[dict[str, str], set[str], dict[str, str]]:
    """(set variables, variables listed unset as `# NAME=`, the comment above each)."""
    values: dict[str, str] = {}
    unset: set[str] = set()
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in (ROOT / ".env.sample").read_text().splitlines():
        active = re.fullmatch(r"(TRAINYARD_[A-Z0-9_]+)=(.*)", line)
        commented = re.fullmatch(r"#\s*(TRAINYARD_[A-Z0-9_]+)=", line)
        if active or commented:
            match = active or commented
            assert match is not None
            name = match[1]
            assert name not in values, f"{name} is listed twice"
            assert name not in unset, f"{name} is listed twice"
            if active:
                values[name] = active[2]
            else:
                unset.add(name)
            comments[name] = " ".join(block)
        elif line.startswith("#"):
            block.append(line.lstrip("# ").strip())
            continue
        block = []
    return values, unset, comments


def test_the_env_sample_lists_every_setting_and_nothing_else() -> None:
    values, unset, _ = sample()
    known = variables(settings_classes())
    assert sorted(set(known) - set(values) - unset) == [], "missing from .env.sample"
    assert sorted((set(values) | unset) - set(known)) == [], "not a setting of any process"


def test_each_sample_value_is_the_default_and_says_what_it_means(
    clean_env: pytest.MonkeyPatch,
) -> None:
    values, unset, comments = sample()
    known = variables(settings_classes())
    for name, classes in known.items():
        field_name = name.removeprefix("TRAINYARD_").lower()
        meanings = [cls.model_fields[field_name].description for cls in classes]
        comment = re.sub(r"\s+", " ", comments.get(name, "")).lower()
        assert comment, f"{name} has no comment"
        said = [m for m in meanings if m and re.sub(r"\s+", " ", m).lower() in comment]
        assert said or not any(meanings), f"{name}: say {meanings[0]!r} above it"
        for cls in classes:
            field = cls.model_fields[field_name]
            if name in unset:
                assert field.default is None or field.default_factory is not None, (
                    f"{name} has a default ({field.default!r}): list it with it"
                )
                continue
            clean_env.setenv(name, values[name])
            parsed = getattr(cls(_env_file=None), field_name)
            clean_env.delenv(name)
            assert parsed == field.default, f"{name}={values[name]} is not its default"


def test_the_env_sample_works_as_a_dotenv_file(clean_env: pytest.MonkeyPatch) -> None:
    for cls in settings_classes():
        cls(_env_file=ROOT / ".env.sample")
