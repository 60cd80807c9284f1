"""Checks before local mode starts anything: the settings parse, and the services answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import psycopg
import redis
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from domain.settings import StoreSettings
from gateway.builds import BuildSettings
from gateway.settings import GatewaySettings
from handlers.settings import HandlerSettings
from projections.settings import ProjectionSettings
from trainer.archive import ArchiveSettings
from trainer.modelstore import ModelStoreSettings
from trainer.settings import NodeSettings

S = TypeVar("S", bound=BaseSettings)

# The settings classes each process reads.
PROCESS_SETTINGS: dict[str, tuple[type[BaseSettings], ...]] = {
    "gateway": (StoreSettings, GatewaySettings, ModelStoreSettings, BuildSettings),
    "handlers": (StoreSettings, HandlerSettings),
    "projections": (StoreSettings, ProjectionSettings),
    "train-node": (NodeSettings, ModelStoreSettings, ArchiveSettings),
}
SERVICES_HINT = "scripts/services.sh (from a Trainyard checkout) starts every service that is down"


def settings_from(cls: type[S], env: Mapping[str, str]) -> S:
    """`cls` with every field that `env` sets (by its TRAINYARD_* name) taken from `env`."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    values: dict[str, Any] = {
        name: env[key] for name in cls.model_fields if (key := f"{prefix}{name}".upper()) in env
    }
    return cls(**values)


def check_settings(env: Mapping[str, str]) -> list[str]:
    """Every problem of the settings each process would read from `env`, one line each."""
    problems: list[str] = []
    classes = dict.fromkeys(cls for group in PROCESS_SETTINGS.values() for cls in group)
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix", ""))
        try:
            settings_from(cls, env)
        except ValidationError as error:
            for item in error.errors():
                where = f"{prefix}{item['loc'][0]}".upper() if item["loc"] else cls.__name__
                value = f" (got {item['input']!r})" if item["loc"] else ""
                line = f"{where}: {item['msg']}{value}"
                if line not in problems:
                    problems.append(line)
    return problems


def redact(url: str) -> str:
    """`url` without its password."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(a malformed URL)"


def first_line(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_redis(url: str) -> str | None:
    """None if Redis answers PING at `url`, else why not."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as error:
        return first_line(error)
    return None


def check_rabbitmq(url: str) -> str | None:
    """None if RabbitMQ accepts a connection at `url`, else why not."""

    async def connect() -> None:
        connection = await aio_pika.connect(url, timeout=10)
        await connection.close()

    quiet = logging.getLogger("aiormq")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs the same failure we report
    try:
        asyncio.run(connect())
    except (OSError, TimeoutError, ValueError) as error:
        return first_line(error)
    finally:
        quiet.setLevel(level)
    return None


def check_postgres(store: StoreSettings) -> str | None:
    """None if the event store's PostgreSQL accepts a connection, else why not."""
    try:
        with psycopg.connect(
            host=store.postgres_host,
            port=store.postgres_port,
            dbname=store.postgres_dbname,
            user=store.postgres_user,
            password=store.postgres_password,
            connect_timeout=5,
        ):
            pass
    except psycopg.Error as error:
        return first_line(error)
    return None


def check_services(env: Mapping[str, str]) -> list[str]:
    """A message for each service that does not answer, naming it and how to start it."""
    problems: list[str] = []
    handlers = settings_from(HandlerSettings, env)
    store = settings_from(StoreSettings, env)
    if (why := check_rabbitmq(handlers.amqp_url)) is not None:
        problems.append(
            f"RabbitMQ does not answer at {redact(handlers.amqp_url)}: {why}\n"
            "  start it with `rabbitmq-server -detached` (or `docker compose up -d rabbitmq`), "
            "or set TRAINYARD_AMQP_URL to a RabbitMQ that runs"
        )
    if (why := check_redis(handlers.redis_url)) is not None:
        problems.append(
            f"Redis does not answer at {redact(handlers.redis_url)}: {why}\n"
            "  start it with `redis-server --daemonize yes --port 6379 --save ''` (or "
            "`docker compose up -d redis`), or set TRAINYARD_REDIS_URL to a Redis that runs"
        )
    if store.event_store == "postgres" and (why := check_postgres(store)) is not None:
        problems.append(
            f"PostgreSQL does not answer at {store.postgres_host}:{store.postgres_port}: {why}\n"
            "  start it with `pg_ctlcluster 15 main start` (or `docker compose up -d postgres`), "
            "or unset TRAINYARD_EVENT_STORE to use the embedded SQLite store"
        )
    return problems
