"""`trainyard`: the command-line client of a Trainyard gateway, and the local-mode tools.

Every command that talks to a gateway takes `--url` (TRAINYARD_URL) and `--token`
(TRAINYARD_TOKEN); `--json` prints machine-readable output on stdout. Exit codes: 0 success,
1 refused request or failed job, 2 usage error, 3 gateway unreachable, 4 token missing or
refused, 5 a model or a rerun that does not verify.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml

from cli.client import (
    AUTH_HINT,
    DEFAULT_URL,
    EXIT_AUTH,
    STATUSES,
    CliError,
    End,
    Gateway,
    JobStream,
    Model,
    ModelFile,
    Reconnecting,
    Snapshot,
    Update,
    save_verified,
    stream_items,
)
from cli.render import (
    WatchView,
    console,
    emit_json,
    events_table,
    job_details,
    jobs_table,
    max_steps_of,
    nodes_table,
)


@dataclass
class Options:
    """The global options."""

    url: str
    token: str | None
    json: bool

    def gateway(self, *, auth: bool = True) -> Gateway:
        """A client of the gateway; refuses to start without a token when one is needed."""
        if auth and not self.token:
            raise CliError(f"no token given: {AUTH_HINT}", EXIT_AUTH)
        return Gateway(self.url, self.token)


@dataclass(frozen=True)
class FollowResult:
    """How a followed job ended."""

    job_id: str
    status: str
    model: ModelFile | None
    reconnects: int


def submitted_spec(gateway: Gateway, job_id: str) -> dict[str, Any]:
    """The spec the job was submitted with, from its first recorded event."""
    for event in gateway.events_page(job_id, after=0, limit=5):
        if event.get("type") == "Job.Submitted":
            spec = (event.get("data") or {}).get("spec")
            if isinstance(spec, dict):
                return spec
    raise CliError(f"job {job_id} has no Submitted event in its history")


def _trainer_config(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        config = yaml.safe_load(str(spec.get("config", "")))
    except yaml.YAMLError:
        return {}
    return config if isinstance(config, dict) else {}


def follow(
    gateway: Gateway,
    job_id: str,
    *,
    save_to: Path | None = None,
    json_mode: bool = False,
    after: str | None = None,
    quiet: bool = False,
    check: Callable[[], None] | None = None,
) -> FollowResult:
    """Watch a job to its end over the WebSocket; save (and verify) its model if asked."""
    spec = submitted_spec(gateway, job_id)
    max_steps = max_steps_of(spec, _trainer_config(spec))
    stream = JobStream(gateway.url, gateway.token, job_id, model=save_to is not None, after=after)
    status = ""
    saved: ModelFile | None = None
    with WatchView(console(), job_id, max_steps, json_mode=json_mode, quiet=quiet) as view:
        for item in stream_items(stream, check):
            if isinstance(item, Snapshot):
                view.snapshot(item.id, item.job)
            elif isinstance(item, Update):
                view.update(item.id, item.update)
            elif isinstance(item, Model):
                if save_to is not None:
                    saved = save_verified(item.data, item.sha256, save_to)
                view.model(item.sha256, len(item.data), str(save_to) if save_to else None)
            elif isinstance(item, Reconnecting):
                view.reconnecting(item.reason, item.delay, item.after)
            elif isinstance(item, End):
                status = item.status
                view.end(status)
    if save_to is not None and status == "completed" and saved is None:
        # The stream ended without pushing the model: fetch it instead.
        saved = gateway.download_model(job_id, save_to)
        view.model(saved.sha256, saved.size, str(saved.path))
    return FollowResult(job_id, status, saved, stream.reconnects)


def _fail_unless_completed(result: FollowResult, gateway: Gateway) -> None:
    if result.status == "completed":
        return
    reason = ""
    if result.status == "failed":
        reason = gateway.job(result.job_id).get("reason") or ""
    raise CliError(
        f"job {result.job_id} {result.status or 'ended'}" + (f": {reason}" if reason else "")
    )


def parse_env(_ctx: click.Context, _param: click.Parameter, value: str) -> dict[str, str]:
    """`builtin:NAME` or `sha256:HASH` as the spec's env object."""
    kind, sep, name = value.partition(":")
    if not sep or kind not in ("builtin", "sha256") or not name:
        raise click.BadParameter(
            f"must be builtin:NAME (a stand-in build, e.g. builtin:reach) or sha256:HASH "
            f"(an uploaded build), got {value!r}"
        )
    return {kind: name}


class TrainyardGroup(click.Group):
    """Turns CliErrors into their message on stderr and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as error:
            click.echo(f"error: {error.message}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


pass_options = click.make_pass_decorator(Options)


@click.group(cls=TrainyardGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="TRAINYARD_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The gateway's URL (env TRAINYARD_URL).",
)
@click.option("--token", envvar="TRAINYARD_TOKEN", help="Client token (env TRAINYARD_TOKEN).")
@click.option("--json", "json_mode", is_flag=True, help="Machine-readable JSON on stdout.")
@click.version_option(package_name="trainyard", prog_name="trainyard")
@click.pass_context
def cli(ctx: click.Context, url: str, token: str | None, json_mode: bool) -> None:
    """Train Unity ML-Agents behaviours on Trainyard train nodes."""
    ctx.obj = Options(url=url, token=token or None, json=json_mode)


@cli.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--env",
    "env",
    required=True,
    callback=parse_env,
    metavar="builtin:NAME|sha256:HASH",
    help="The environment build.",
)
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--max-steps", type=int, help="Steps to train (overrides every behaviour's).")
@click.option("--num-envs", type=int, help="Environments run at once (default 1).")
@click.option("--time-limit", "time_limit_s", type=int, help="Seconds before the run is stopped.")
@click.option("--request-id", help="Idempotency key: repeating it returns the same job.")
@click.option("--watch", "watch_", is_flag=True, help="Follow the job until it ends.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --watch: save the model here.",
)
@pass_options
def submit(
    opts: Options,
    config: Path,
    env: dict[str, str],
    seed: int | None,
    max_steps: int | None,
    num_envs: int | None,
    time_limit_s: int | None,
    request_id: str | None,
    watch_: bool,
    output: Path | None,
) -> None:
    """Submit a job: CONFIG is an ML-Agents trainer configuration (YAML)."""
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {config}: {error}") from error
    spec: dict[str, Any] = {"config": text, "env": env}
    for name, value in (
        ("seed", seed),
        ("max_steps", max_steps),
        ("num_envs", num_envs),
        ("time_limit_s", time_limit_s),
    ):
        if value is not None:
            spec[name] = value
    if output is not None and not watch_:
        raise click.UsageError("-o/--output needs --watch (or use `trainyard model JOB -o FILE`)")
    with opts.gateway() as gateway:
        job_id = gateway.submit(spec, request_id)
        if opts.json:
            if not watch_:
                emit_json({"job_id": job_id})
        else:
            console().print(f"submitted job {job_id}")
        if watch_:
            result = follow(gateway, job_id, save_to=output, json_mode=opts.json)
            _fail_unless_completed(result, gateway)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save the pushed model here (its sha256 is checked).",
)
@click.option("--after", help="Resume after this update id instead of starting with a snapshot.")
@pass_options
def watch(opts: Options, job_id: str, output: Path | None, after: str | None) -> None:
    """Follow a job live until it ends (exit 1 if it fails or is cancelled)."""
    with opts.gateway() as gateway:
        result = follow(gateway, job_id, save_to=output, json_mode=opts.json, after=after)
        _fail_unless_completed(result, gateway)


@cli.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@pass_options
def list_jobs(opts: Options, status: str | None, limit: int) -> None:
    """List your jobs, newest first."""
    with opts.gateway() as gateway:
        jobs = gateway.jobs(status=status, limit=limit)
    if opts.json:
        emit_json(jobs)
    elif not jobs:
        console().print("no jobs" + (f" with status {status}" if status else ""))
    else:
        console().print(jobs_table(jobs))


@cli.command()
@click.argument("job_id", metavar="JOB")
@pass_options
def status(opts: Options, job_id: str) -> None:
    """Show one job: status, attempt, node, latest step and reward."""
    with opts.gateway() as gateway:
        job = gateway.job(job_id)
    if opts.json:
        emit_json(job)
    else:
        console().print(job_details(job))


@cli.command()
@click.argument("job_id", metavar="JOB")
@pass_options
def cancel(opts: Options, job_id: str) -> None:
    """Cancel a job (a running one stops once its node confirms)."""
    with opts.gateway() as gateway:
        answer = gateway.cancel(job_id)
    if opts.json:
        emit_json(answer)
    elif answer.get("status") == "cancelled":
        console().print(f"job {job_id} cancelled")
    else:
        console().print(
            f"cancel requested: job {job_id} is {answer.get('status')}; its node was told to stop"
        )


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to save the .onnx.",
)
@pass_options
def model(opts: Options, job_id: str, output: Path) -> None:
    """Download a completed job's model, checking its sha256 (exit 5 on a mismatch)."""
    with opts.gateway() as gateway:
        saved = gateway.download_model(job_id, output)
    if opts.json:
        emit_json(
            {"job_id": job_id, "path": str(saved.path), "sha256": saved.sha256, "size": saved.size}
        )
    else:
        console().print(f"saved {saved.size} bytes to {saved.path}, sha256 {saved.sha256} verified")


@cli.command()
@click.argument("job_id", metavar="JOB")
@pass_options
def events(opts: Options, job_id: str) -> None:
    """Show a job's recorded history (its events, in log order)."""
    with opts.gateway() as gateway:
        items = gateway.events(job_id)
    if opts.json:
        emit_json(items)
    else:
        console().print(events_table(items))


@cli.command()
@pass_options
def nodes(opts: Options) -> None:
    """List the live train nodes."""
    with opts.gateway() as gateway:
        answer = gateway.nodes()
    items = answer.get("nodes", []) if isinstance(answer, dict) else answer
    if opts.json:
        emit_json(items)
    elif not items:
        console().print("no live train nodes")
    else:
        console().print(nodes_table(items))


@cli.group()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use the event store of the local mode in this directory "
    "(default: the TRAINYARD_* settings and .env).",
)
@click.pass_context
def token(ctx: click.Context, data_dir: Path | None) -> None:
    """Manage client tokens in the event store's database (run where the gateway's store is)."""
    ctx.obj = data_dir


def _token_command(ctx: click.Context, *args: str) -> NoReturn:
    from domain.settings import StoreSettings
    from gateway.__main__ import main as gateway_main

    data_dir: Path | None = ctx.obj
    store = None
    if data_dir is not None:
        from cli.local import local_defaults

        defaults = local_defaults(data_dir.resolve())
        store = StoreSettings(
            event_store="sqlite", sqlite_path=Path(defaults["TRAINYARD_SQLITE_PATH"])
        )
        if not store.sqlite_path.exists():
            raise CliError(f"no local mode data in {data_dir} (no {store.sqlite_path.name})")
    raise SystemExit(gateway_main(["token", *args], store=store))


@token.command("create")
@click.argument("client_id")
@click.pass_context
def token_create(ctx: click.Context, client_id: str) -> None:
    """Create a token for CLIENT_ID; it is printed once."""
    _token_command(ctx, "create", client_id)


@token.command("revoke")
@click.argument("token_id", metavar="TOKEN")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke a token, by its id (ty_<id>) or the whole token."""
    _token_command(ctx, "revoke", token_id)


@token.command("list")
@click.argument("client_id", required=False)
@click.pass_context
def token_list(ctx: click.Context, client_id: str | None) -> None:
    """List tokens (ids, never secrets), of one client or all."""
    _token_command(ctx, "list", *([client_id] if client_id else []))


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def local(args: tuple[str, ...]) -> None:
    """Run the whole system on this machine (gateway, central node, one train node)."""
    from cli import local as local_mode

    raise SystemExit(local_mode.main(list(args)))


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only show where the node would connect.")
def node(dry_run: bool) -> None:
    """Run a train node against a central node, configured from .env and TRAINYARD_*."""
    from pydantic import ValidationError

    from trainer.modelstore import ModelStoreSettings
    from trainer.settings import NodeSettings

    try:
        settings = NodeSettings()
        store = ModelStoreSettings()
    except ValidationError as error:
        raise CliError(f"the train node's settings are invalid:\n{error}") from error
    out = console()
    store_text = (
        f"s3://{store.s3_bucket}"
        + (f" at {store.s3_endpoint_url}" if store.s3_endpoint_url else "")
        if store.model_store == "s3"
        else f"directory {store.model_dir.resolve()}"
    )
    out.print(f"train node {settings.node_id}: {settings.trainer_slots} slot(s)")
    out.print(f"  broker  {_redact(settings.amqp_url)} (queue prefix {settings.queue_prefix!r})")
    out.print(f"  redis   {_redact(settings.redis_url)}")
    out.print(f"  models  {store_text}")
    out.print(f"  runs    {settings.runs_dir.resolve()}")
    if dry_run:
        return
    faststream = Path(sys.executable).with_name("faststream")
    if not faststream.exists():
        raise CliError(f"{faststream} not found: install Trainyard with its dependencies")
    sys.stdout.flush()
    os.execv(faststream, [str(faststream), "run", "trainer.node:app"])  # noqa: S606


def _redact(url: str) -> str:
    """A URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@cli.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep local mode's files here (default: a temporary directory, removed afterwards).",
)
@click.option(
    "--build",
    type=click.Choice(["gridgoal", "reach"]),
    default="gridgoal",
    show_default=True,
    help="The stand-in build to train.",
)
@click.option("--max-steps", type=click.IntRange(1000, 200_000), help="Steps to train.")
def demo(data_dir: Path | None, build: str, max_steps: int | None) -> None:
    """Start local mode, train a stand-in build, receive and check the model."""
    from cli.demo import run_demo

    run_demo(data_dir=data_dir, build=build, max_steps=max_steps)


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--rerun", is_flag=True, help="Run the same spec again and compare reward curves.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep the downloaded model here (default: checked, then discarded).",
)
@pass_options
def audit(opts: Options, job_id: str, rerun: bool, output: Path | None) -> None:
    """Replay a job's events: its provenance, attempts, metrics; verify its model."""
    from cli.audit import run_audit

    with opts.gateway() as gateway:
        run_audit(gateway, job_id, rerun=rerun, output=output, json_mode=opts.json)


def main(argv: Sequence[str] | None = None) -> None:
    """The `trainyard` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="trainyard")


if __name__ == "__main__":
    main()
