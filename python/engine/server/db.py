"""The server's SQLite file: API keys (salted hashes only) and the usage ledger.

WAL mode, so that `engine keys ...` in another process writes while the server reads; every
write is one BEGIN IMMEDIATE transaction. The file is created readable by its owner only.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from typing import Iterator

DB_FILE = "engine.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,          -- never reused, also after revocation
    prefix TEXT NOT NULL UNIQUE,        -- the public start of the secret, for lookup
    secret_hash TEXT NOT NULL,          -- scrypt$n$r$p$salt$hash (hex)
    models TEXT,                        -- JSON list; NULL: every model
    endpoints TEXT,                     -- JSON list; NULL: every endpoint
    rpm INTEGER, tpm INTEGER, token_quota INTEGER, budget_usd REAL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS usage (
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    day TEXT NOT NULL,                  -- UTC, YYYY-MM-DD
    num_requests INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (key_name, model, day)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('keys_version', 0);
"""


def default_data_dir() -> str:
    """$ENGINE_DATA_DIR, else $XDG_DATA_HOME/engine, else ~/.local/share/engine."""
    if os.environ.get("ENGINE_DATA_DIR"):
        return os.environ["ENGINE_DATA_DIR"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "share")
    return os.path.join(base, "engine")


def connect(data_dir: str) -> sqlite3.Connection:
    """Open (creating if needed) the database under data_dir.

    Args:
        data_dir: a directory; created with mode 0700 if missing.
    Returns:
        A connection in autocommit mode (use `transaction` to write) that any thread may use
        one at a time.
    """
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(data_dir, DB_FILE)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)  # idempotent: IF NOT EXISTS / OR IGNORE throughout
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
