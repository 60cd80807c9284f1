"""`python -m gateway token create|revoke|list`: manage client tokens.

The tokens live in the event store's database (TRAINYARD_EVENT_STORE and friends).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from domain.settings import StoreSettings
from gateway.db import create_database
from gateway.tokens import InvalidClientIdError, TokenStore


def main(argv: Sequence[str] | None = None, store: StoreSettings | None = None) -> int:
    """Run one token command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    commands = parser.add_subparsers(dest="group", required=True)
    token = commands.add_parser("token", help="client tokens").add_subparsers(
        dest="command", required=True
    )
    create = token.add_parser("create", help="create a token for a client; printed once")
    create.add_argument("client_id")
    revoke = token.add_parser("revoke", help="revoke a token, by its id or the whole token")
    revoke.add_argument("token")
    listing = token.add_parser("list", help="list tokens (ids, never secrets)")
    listing.add_argument("client_id", nargs="?")
    args = parser.parse_args(argv)

    db = create_database(store or StoreSettings(), pool_size=1)
    db.open()
    try:
        tokens = TokenStore(db)
        tokens.create_table()
        if args.command == "create":
            try:
                print(tokens.create(args.client_id))
            except InvalidClientIdError as error:
                print(error, file=sys.stderr)
                return 2
        elif args.command == "revoke":
            if not tokens.revoke(args.token):
                print("no live token has that id", file=sys.stderr)
                return 1
            print("revoked")
        else:
            for info in tokens.list(args.client_id):
                state = f"revoked {info.revoked_at}" if info.revoked_at else "live"
                print(f"{info.token_id}\t{info.client_id}\tcreated {info.created_at}\t{state}")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
