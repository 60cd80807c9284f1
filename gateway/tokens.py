"""Client tokens: created by an operator, stored hashed, each belonging to one client.

A token reads `ty_<id>.<secret>`: `id` (12 hex digits) names the row and, as `ty_<id>`, is
safe to show (listing shows it, revocation takes it); `secret` is 32 random bytes, URL-safe
base64. Only the secret's sha256 is stored, and a presented secret is compared with it in
constant time. A token is never stored or shown again after `create` prints it.
"""

# Table names in these statements are module constants, never input.
# ruff: noqa: S608

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.db import Database

TOKENS_TABLE = "client_tokens"
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_TOKEN = re.compile(r"ty_(?P<id>[0-9a-f]{12})\.(?P<secret>[A-Za-z0-9_-]{43})")
_DDL = (
    f"CREATE TABLE IF NOT EXISTS {{schema}}.{TOKENS_TABLE} ("
    " token_id text PRIMARY KEY,"
    " client_id text NOT NULL,"
    " secret_sha256 text NOT NULL,"
    " created_at text NOT NULL,"
    " revoked_at text)"
)


class InvalidClientIdError(ValueError):
    """A client id that cannot own jobs."""


@dataclass(frozen=True)
class TokenInfo:
    """One stored token, without its secret."""

    token_id: str
    client_id: str
    created_at: str
    revoked_at: str | None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def check_client_id(client_id: str) -> str:
    """Return `client_id` if it is valid, else raise InvalidClientIdError.

    Job ids are derived from `client_id:request_id`, so a client id must not contain ':'
    (else two clients could name the same job).
    """
    if not CLIENT_ID.fullmatch(client_id):
        raise InvalidClientIdError(
            f"client id {client_id!r} must be 1-128 characters: a letter or digit, then "
            "letters, digits, '.', '_', '@' or '-'"
        )
    return client_id


class TokenStore:
    """The `client_tokens` table in the event store's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_table(self) -> None:
        """Create the table if it is not there yet."""
        self.db.create(_DDL)

    def create(self, client_id: str) -> str:
        """A new token for `client_id`; the only time the token is ever available."""
        check_client_id(client_id)
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        self.db.execute(
            f"INSERT INTO {{schema}}.{TOKENS_TABLE} "
            "(token_id, client_id, secret_sha256, created_at) VALUES (%s, %s, %s, %s)",
            (token_id, client_id, _sha256(secret), _now()),
        )
        return f"ty_{token_id}.{secret}"

    def authenticate(self, token: str) -> str | None:
        """The client a live token belongs to, or None for a malformed, unknown or revoked one."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        rows = self.db.fetchall(
            f"SELECT client_id, secret_sha256 FROM {{schema}}.{TOKENS_TABLE} "
            "WHERE token_id = %s AND revoked_at IS NULL",
            (match["id"],),
        )
        if not rows:
            return None
        if not hmac.compare_digest(_sha256(match["secret"]), rows[0]["secret_sha256"]):
            return None
        client_id: str = rows[0]["client_id"]
        return client_id

    def revoke(self, token_or_id: str) -> bool:
        """Revoke a token, by its id (`ty_<12 hex>`) or whole; False if no live token matched."""
        match = _TOKEN.fullmatch(token_or_id)
        token_id = match["id"] if match else token_or_id.removeprefix("ty_")
        changed = self.db.execute(
            f"UPDATE {{schema}}.{TOKENS_TABLE} SET revoked_at = %s "
            "WHERE token_id = %s AND revoked_at IS NULL",
            (_now(), token_id),
        )
        return changed > 0

    def list(self, client_id: str | None = None) -> list[TokenInfo]:
        """Every token (of one client, if given), oldest first."""
        where, params = ("WHERE client_id = %s ", (client_id,)) if client_id else ("", ())
        rows = self.db.fetchall(
            f"SELECT token_id, client_id, created_at, revoked_at FROM {{schema}}.{TOKENS_TABLE} "
            f"{where}ORDER BY created_at, token_id",
            params,
        )
        return [TokenInfo(**{**row, "token_id": f"ty_{row['token_id']}"}) for row in rows]
