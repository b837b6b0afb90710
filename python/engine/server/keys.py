"""API keys: create, list, revoke, rotate; only salted scrypt hashes are stored.

A secret reads "sk-" + 43 url-safe characters (256 random bits). Its first PREFIX_CHARS
characters after "sk-" are stored in clear as a lookup index (and shown by `engine keys
list`); the whole secret is checked against its scrypt hash with hmac.compare_digest.
Every change bumps meta.keys_version in the same transaction, which is how a running
server notices it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone

from engine.server.db import transaction

ENDPOINTS = ("completions", "chat", "embeddings", "tokenize", "models")
PREFIX_CHARS = 12
_SCRYPT = dict(n=1 << 14, r=8, p=1)  # 16 MiB, ~40 ms: paid once per key per server process
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def hash_secret(secret: str) -> str:
    """A fresh salted scrypt hash of secret, encoded with its parameters."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_secret(secret: str, encoded: str) -> bool:
    """Whether secret matches an encoded hash from hash_secret (constant-time compare)."""
    try:
        kind, n, r, p, salt, digest = encoded.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(digest) // 2)
    except ValueError:
        return False
    return hmac.compare_digest(got, bytes.fromhex(digest))


def secret_prefix(secret: str) -> str | None:
    """The lookup prefix of a well-formed secret, else None."""
    if not secret.startswith("sk-") or len(secret) < 3 + PREFIX_CHARS + 16:
        return None
    return secret[3:3 + PREFIX_CHARS]


@dataclass(frozen=True)
class ApiKey:
    """One key's record (never its secret). models / endpoints None: no restriction."""
    id: int
    name: str
    prefix: str
    secret_hash: str
    models: frozenset[str] | None
    endpoints: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    token_quota: int | None
    budget_usd: float | None
    created_at: str
    revoked_at: str | None

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def allows_endpoint(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints

    def describe(self) -> dict:
        """A JSON-friendly summary without the hash."""
        return {"name": self.name, "key": f"sk-{self.prefix}...",
                "models": sorted(self.models) if self.models is not None else None,
                "endpoints": sorted(self.endpoints) if self.endpoints is not None else None,
                "rpm": self.rpm, "tpm": self.tpm, "token_quota": self.token_quota,
                "budget_usd": self.budget_usd, "created_at": self.created_at,
                "revoked_at": self.revoked_at}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _positive(name: str, value, kind=int):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or not value > 0:
        raise ValueError(f"{name} must be a positive {'number' if kind is float else 'integer'},"
                         f" got {value!r}")
    return value


class KeyStore:
    """The keys table.

    Args:
        conn: a connection from engine.server.db.connect.
    """

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def create(self, name: str, *, models: list[str] | None = None,
               endpoints: list[str] | None = None, rpm: int | None = None,
               tpm: int | None = None, token_quota: int | None = None,
               budget_usd: float | None = None) -> tuple[ApiKey, str]:
        """Add a key.

        Returns:
            (the record, the secret): the secret is not stored and cannot be shown again.
        Raises:
            ValueError: a bad name, scope or limit, or the name is taken.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"key name must be 1-64 characters of letters, digits and _.@- "
                             f"(starting with a letter or digit), got {name!r}")
        if models is not None and (not models or not all(isinstance(m, str) and m for m in models)):
            raise ValueError(f"models must be a non-empty list of model names, got {models!r}")
        if endpoints is not None:
            unknown = sorted(set(endpoints) - set(ENDPOINTS)) if endpoints else ["(none given)"]
            if unknown:
                raise ValueError(f"unknown endpoints {unknown}; choose from {list(ENDPOINTS)}")
        for label, value in (("rpm", rpm), ("tpm", tpm), ("token_quota", token_quota)):
            _positive(label, value)
        _positive("budget_usd", budget_usd, float)
        if token_quota is not None and budget_usd is not None:
            raise ValueError("give a token quota or a budget, not both")
        secret = "sk-" + secrets.token_urlsafe(32)
        try:
            with transaction(self.conn):
                self.conn.execute(
                    "INSERT INTO keys (name, prefix, secret_hash, models, endpoints, rpm, tpm, "
                    "token_quota, budget_usd, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (name, secret_prefix(secret), hash_secret(secret),
                     json.dumps(sorted(set(models))) if models is not None else None,
                     json.dumps(sorted(set(endpoints))) if endpoints is not None else None,
                     rpm, tpm, token_quota, budget_usd, _now()))
                self._bump()
        except sqlite3.IntegrityError:
            raise ValueError(f"a key named {name!r} already exists (names are never reused, "
                             "also after revocation)") from None
        return self.get(name), secret

    def get(self, name: str) -> ApiKey:
        """Raises ValueError if there is no key of that name."""
        row = self.conn.execute("SELECT * FROM keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ValueError(f"no key named {name!r}")
        return _from_row(row)

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        return [_from_row(r) for r in self.conn.execute("SELECT * FROM keys ORDER BY id")]

    def revoke(self, name: str) -> ApiKey:
        """Revoke a key at once (idempotent). Raises ValueError for an unknown name."""
        with transaction(self.conn):
            cur = self.conn.execute("UPDATE keys SET revoked_at = ? WHERE name = ? AND "
                                    "revoked_at IS NULL", (_now(), name))
            if cur.rowcount:
                self._bump()
        return self.get(name)

    def rotate(self, name: str) -> tuple[ApiKey, str]:
        """Give an active key a new secret; the old one stops working. Scopes, limits and
        usage stay with the name. Raises ValueError for an unknown or revoked key."""
        if not self.get(name).is_active:
            raise ValueError(f"key {name!r} is revoked; create a new key instead")
        secret = "sk-" + secrets.token_urlsafe(32)
        with transaction(self.conn):
            self.conn.execute("UPDATE keys SET prefix = ?, secret_hash = ? WHERE name = ?",
                              (secret_prefix(secret), hash_secret(secret), name))
            self._bump()
        return self.get(name), secret

    def version(self) -> int:
        """A number that changes whenever any key does (cheap: one indexed read)."""
        return self.conn.execute("SELECT value FROM meta WHERE name = 'keys_version'").fetchone()[0]

    def _bump(self) -> None:
        self.conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_version'")


def _from_row(row: sqlite3.Row) -> ApiKey:
    def scope(text):
        return frozenset(json.loads(text)) if text is not None else None
    return ApiKey(row["id"], row["name"], row["prefix"], row["secret_hash"], scope(row["models"]),
                  scope(row["endpoints"]), row["rpm"], row["tpm"], row["token_quota"],
                  row["budget_usd"], row["created_at"], row["revoked_at"])
