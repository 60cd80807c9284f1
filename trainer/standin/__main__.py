"""Command line of a stand-in build: `python -m trainer.standin NAME --mlagents-port N ...`.

Takes what a Unity player is given (`--mlagents-port`, `-nographics`, `-batchmode`, `-logFile`) and
ignores other Unity flags; `--fault` injects failures for tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.standin.envs import ENVIRONMENTS
from trainer.standin.protocol import Fault, Player, hang_forever

log = logging.getLogger("trainer.standin")

FAULTS = ("never-connect", "crash-after", "hang-after")
USAGE_EXIT_CODE = 2


def _parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m trainer.standin {name}",
        description="A stand-in Unity build that trains with mlagents-learn.",
        allow_abbrev=False,
        # Unity flags are single-dash words; "-h" would swallow e.g. "-hidewindow".
        add_help=False,
    )
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("--mlagents-port", type=int, default=5004, help="trainer's port")
    parser.add_argument("-logFile", "-logfile", dest="log_file", help="log path ('-': stderr)")
    # Nothing is rendered anyway.
    parser.add_argument("-nographics", action="store_true", help="accepted, like Unity")
    parser.add_argument("-batchmode", action="store_true", help="accepted, like Unity")
    parser.add_argument("--agents", type=int, default=8, help="agents per training area")
    parser.add_argument(
        "--fault",
        nargs="+",
        metavar="WORD",
        help="never-connect | crash-after K | hang-after K",
    )
    return parser


def _fault(words: Sequence[str] | None) -> Fault | None:
    if not words:
        return None
    kind, *rest = words
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}; expected one of {', '.join(FAULTS)}")
    if kind == "never-connect":
        if rest:
            raise ValueError("never-connect takes no step count")
        return Fault(kind)
    if len(rest) != 1 or not rest[0].isdigit():
        raise ValueError(f"{kind} needs a step count, e.g. --fault {kind} 10")
    return Fault(kind, int(rest[0]))


def _configure_logging(log_file: str | None) -> None:
    handler: logging.Handler
    if log_file and log_file != "-":
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the build named by the first argument; returns the exit code."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] not in ENVIRONMENTS:
        print(
            f"usage: python -m trainer.standin {{{','.join(ENVIRONMENTS)}}} [options]",
            file=sys.stderr,
        )
        return USAGE_EXIT_CODE
    name = args_in[0]
    parser = _parser(name)
    # A Unity player ignores the command-line flags it does not know.
    args, unknown = parser.parse_known_args(args_in[1:])
    try:
        fault = _fault(args.fault)
    except ValueError as error:
        parser.error(str(error))
    if args.agents < 1:
        parser.error("--agents must be at least 1")
    _configure_logging(args.log_file)
    log.info("stand-in build %s starting, port %d, args %s", name, args.mlagents_port, args_in[1:])
    if unknown:
        log.info("ignoring unknown arguments %s", unknown)
    if fault is not None and fault.kind == "never-connect":
        hang_forever("never connecting to the trainer")
    player = Player(ENVIRONMENTS[name], args.agents, fault)
    code = player.run(args.mlagents_port)
    log.info("exiting with code %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
