"""`trainyard demo`: the whole path once, on this machine, in a couple of minutes.

Starts local mode (gateway, handlers, projections, one train node) in `./.trainyard-demo` (or
`--data-dir`), submits a small PPO job on a stand-in build, shows its progress live over the
WebSocket, receives the model pushed at the end, checks its sha256 and `onnx.checker`, prints a
summary and stops local mode. Queue and Redis key prefixes of its own keep it apart from a
`trainyard local` running on the same machine. Any failure ends it non-zero with the reason.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import yaml

from cli.client import EXIT_FAILED, EXIT_VERIFY, CliError, Gateway
from cli.render import console, fmt_duration, fmt_reward, reward_of

DEFAULT_DATA_DIR: Final = Path(".trainyard-demo")
READY_TIMEOUT_S: Final = 180.0
TRAIN_TIMEOUT_S: Final = 600.0  # from submit to model; the demo takes about a minute here
# What each stand-in build trains with: behaviour, steps, and PPO settings that learn it fast.
BUILDS: Final[dict[str, tuple[str, int, dict[str, Any]]]] = {
    "gridgoal": ("GridGoal", 20_000, {"beta": 1.0e-2}),
    "reach": ("Reach", 20_000, {"beta": 1.0e-3}),
}
SEED: Final = 1


def demo_config(behavior: str, max_steps: int, hyper: dict[str, Any]) -> str:
    """A tiny PPO configuration (one layer of 32 units) that learns a stand-in build quickly."""
    summary_freq = max(500, max_steps // 20)
    config = {
        "behaviors": {
            behavior: {
                "trainer_type": "ppo",
                "hyperparameters": {
                    "batch_size": 32,
                    "buffer_size": 320,
                    "learning_rate": 1.0e-2,
                    "epsilon": 0.2,
                    "lambd": 0.95,
                    "num_epoch": 3,
                    "learning_rate_schedule": "constant",
                    **hyper,
                },
                "network_settings": {"normalize": False, "hidden_units": 32, "num_layers": 1},
                "reward_signals": {"extrinsic": {"gamma": 0.9, "strength": 1.0}},
                "max_steps": max_steps,
                "time_horizon": 32,
                "summary_freq": summary_freq,
            }
        }
    }
    return yaml.safe_dump(config, sort_keys=False)


def _onnx_check(path: Path) -> None:
    try:
        import onnx
    except ImportError as error:
        raise CliError(f"cannot check the model: onnx is not installed ({error})") from error
    try:
        onnx.checker.check_model(onnx.load(str(path)))
    except Exception as error:
        raise CliError(
            f"the model {path} fails onnx.checker: {type(error).__name__}: {error}", EXIT_VERIFY
        ) from error


def _demo_environ() -> dict[str, str]:
    """The environment local mode runs with: the demo's own queues and Redis keys."""
    environ = dict(os.environ)
    environ.setdefault("TRAINYARD_QUEUE_PREFIX", "trainyard-demo.")
    environ.setdefault("TRAINYARD_REDIS_KEY_PREFIX", "trainyard-demo:")
    return environ


def run_demo(*, data_dir: Path | None, build: str, max_steps: int | None) -> None:
    """Run the demo; raises CliError with the reason on any failure."""
    from cli.local import LocalMode, LocalModeError
    from cli.main import follow

    behavior, default_steps, hyper = BUILDS[build]
    steps = max_steps or default_steps
    out = console()
    began = time.monotonic()
    root = (data_dir or DEFAULT_DATA_DIR).resolve()
    out.print(f"[bold]Trainyard demo[/]: train {behavior} ({build}) for {steps} steps")
    out.print(f"starting local mode in {root} (process logs in {root / 'logs'}) ...")
    mode = LocalMode(root, port=0, quiet=True, client_id="demo", environ=_demo_environ())
    try:
        with mode:
            mode.wait_ready(READY_TIMEOUT_S)
            out.print(f"local mode is up at {mode.url} ({fmt_duration(time.monotonic() - began)})")
            with Gateway(mode.url, mode.token) as gateway:
                summary = _train(gateway, root, behavior, steps, hyper, follow, mode.check_children)
    except LocalModeError as error:
        tail = getattr(error, "tail", None)
        detail = ("\n  " + "\n  ".join(tail[-15:])) if tail else ""
        raise CliError(f"local mode failed: {error}{detail}") from error
    wall = time.monotonic() - began
    out.print()
    out.print("[bold]Summary[/]")
    for name, value in summary:
        out.print(f"  {name:<13}{value}", markup=False)
    out.print(f"  {'wall time':<13}{fmt_duration(wall)} ({wall:.0f} s, local mode start to stop)")
    out.print("demo finished: the model is trained, received, verified and saved")


def _train(
    gateway: Gateway,
    root: Path,
    behavior: str,
    steps: int,
    hyper: dict[str, Any],
    follow: Any,
    check: Callable[[], None],
) -> list[tuple[str, str]]:
    out = console()
    spec = {
        "config": demo_config(behavior, steps, hyper),
        "env": {"builtin": behavior.lower()},
        "seed": SEED,
        "num_envs": 1,
    }
    job_id = gateway.submit(spec, f"demo-{uuid.uuid4()}")
    out.print(f"submitted job {job_id}; watching it over the WebSocket")
    model_dir = root / "received"
    model_dir.mkdir(parents=True, exist_ok=True)
    destination = model_dir / f"{behavior}-{job_id}.onnx"
    trained = time.monotonic()

    def check_in_time() -> None:
        check()
        if time.monotonic() - trained > TRAIN_TIMEOUT_S:
            status = gateway.job(job_id).get("status", "unknown")
            raise CliError(
                f"the demo job {job_id} is still {status} after {TRAIN_TIMEOUT_S:.0f} s; "
                f"the process logs are in {root / 'logs'}",
                EXIT_FAILED,
            )

    result = follow(gateway, job_id, save_to=destination, check=check_in_time)
    if result.status != "completed":
        reason = gateway.job(job_id).get("reason") or "no reason recorded"
        raise CliError(f"the demo job {job_id} {result.status}: {reason}", EXIT_FAILED)
    if result.model is None:
        raise CliError(f"the demo job {job_id} completed but no model arrived", EXIT_FAILED)
    recorded = gateway.job(job_id).get("model_sha256")
    if recorded != result.model.sha256:
        raise CliError(
            f"the received model's sha256 {result.model.sha256} is not the recorded {recorded}",
            EXIT_VERIFY,
        )
    _onnx_check(result.model.path)
    curve = [
        (int(m["step"]), reward)
        for m in gateway.metrics(job_id)
        if (reward := reward_of(m.get("stats"))) is not None
    ]
    if curve:
        rewards = (
            f"{fmt_reward(curve[0][1])} at step {curve[0][0]} → "
            f"{fmt_reward(curve[-1][1])} at step {curve[-1][0]} ({len(curve)} reports)"
        )
    else:
        rewards = "no reward was reported"
    return [
        ("job", job_id),
        ("model", str(result.model.path)),
        ("model sha256", f"{result.model.sha256} (verified; onnx.checker passed)"),
        ("model size", f"{result.model.size} bytes"),
        ("mean reward", rewards),
        ("training", f"{fmt_duration(time.monotonic() - trained)} from submit to model"),
        ("reconnects", str(result.reconnects)),
    ]
