"""The key store, the ledger and the price table, in process on a real SQLite file."""

import json
import os
import stat

import pytest

from engine.cli import main as cli
from engine.server.db import DB_FILE, connect
from engine.server.keys import KeyStore, hash_secret, secret_prefix, verify_secret
from engine.server.ledger import Ledger, PriceTable


@pytest.fixture
def store(tmp_path):
    conn = connect(str(tmp_path))
    yield KeyStore(conn)
    conn.close()


def test_only_a_salted_hash_is_stored(store, tmp_path):
    key, secret = store.create("alice", models=["m"], endpoints=["chat"], rpm=5)
    again = hash_secret(secret)
    assert again != key.secret_hash  # salted: the same secret hashes differently
    assert verify_secret(secret, key.secret_hash) and verify_secret(secret, again)
    assert not verify_secret(secret[:-1] + ("A" if secret[-1] != "A" else "B"), key.secret_hash)
    assert not verify_secret(secret, "garbage") and not verify_secret(secret, "md5$1$2$3$4$5")
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for name in os.listdir(tmp_path):
        with open(tmp_path / name, "rb") as f:
            data = f.read()
        assert secret.encode() not in data and secret[3:].encode() not in data
    assert stat.S_IMODE(os.stat(tmp_path / DB_FILE).st_mode) == 0o600
    assert key.prefix == secret_prefix(secret) and key.describe()["key"].endswith("...")


def test_create_validates_and_names_are_never_reused(store):
    store.create("bob")
    with pytest.raises(ValueError, match="already exists"):
        store.create("bob")
    store.revoke("bob")
    with pytest.raises(ValueError, match="never reused"):
        store.create("bob")
    for kwargs, message in [({"rpm": 0}, "rpm must be a positive integer"),
                            ({"tpm": -1}, "tpm"), ({"budget_usd": 0}, "budget_usd"),
                            ({"token_quota": 5, "budget_usd": 1.0}, "not both"),
                            ({"endpoints": ["admin"]}, "unknown endpoints"),
                            ({"models": []}, "non-empty list")]:
        with pytest.raises(ValueError, match=message):
            store.create("carol", **kwargs)
    with pytest.raises(ValueError, match="key name"):
        store.create("has space")


def test_revoke_and_rotate_bump_the_version(store):
    v0 = store.version()
    key, secret = store.create("dave")
    assert store.version() > v0
    rotated, new_secret = store.rotate("dave")
    assert new_secret != secret and rotated.prefix != key.prefix
    assert verify_secret(new_secret, rotated.secret_hash)
    assert not verify_secret(secret, rotated.secret_hash)
    v1 = store.version()
    assert not store.revoke("dave").is_active and store.version() > v1
    v2 = store.version()
    store.revoke("dave")  # idempotent, no change
    assert store.version() == v2
    with pytest.raises(ValueError, match="revoked"):
        store.rotate("dave")
    with pytest.raises(ValueError, match="no key named"):
        store.revoke("nobody")


def test_ledger_accumulates_per_key_model_day(tmp_path):
    ledger = Ledger(connect(str(tmp_path)))
    ledger.record("a", "m", 10, 5, 0.5, day="2026-01-01")
    ledger.record("a", "m", 1, 2, 0.25, day="2026-01-01")
    ledger.record("a", "m", 3, 3, 0.0, day="2026-01-02")
    ledger.record("b", "m", 7, 7, 1.0)
    assert ledger.totals("a") == (24, 0.75) and ledger.totals("nobody") == (0, 0.0)
    (first, second) = ledger.rows("a")
    assert (first["num_requests"], first["input_tokens"], first["output_tokens"]) == (2, 11, 7)
    assert second["day"] == "2026-01-02"
    sums = {r["key_name"]: r for r in ledger.totals_by_key_model()}
    assert sums["a"]["input_tokens"] == 14 and sums["b"]["num_requests"] == 1


def test_price_table(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"m": {"input_per_million": 2.0, "output_per_million": 4.0},
                                "*": {"input_per_million": 1.0, "output_per_million": 1.0}}))
    table = PriceTable.load(str(path))
    assert table.cost("m", 1_000_000, 500_000) == pytest.approx(4.0)
    assert table.cost("other", 1_000_000, 0) == pytest.approx(1.0)
    assert PriceTable().cost("m", 10**6, 10**6) == 0.0
    for bad in ({"m": {"input_per_million": -1, "output_per_million": 0}},
                {"m": {"input": 1}}, [1, 2]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="price table"):
            PriceTable.load(str(path))
    with pytest.raises(ValueError, match="price table"):
        PriceTable.load(str(tmp_path / "missing.json"))


def test_keys_cli(tmp_path, capsys):
    base = ["keys", "--data-dir", str(tmp_path)]
    assert cli(base + ["create", "--name", "eve", "--models", "a,b", "--endpoints", "chat",
                       "--tpm", "100", "--budget", "2.5"]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith("sk-")
    assert cli(base + ["list"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["models"] == ["a", "b"] and listed["endpoints"] == ["chat"]
    assert listed["budget_usd"] == 2.5 and secret not in json.dumps(listed)
    assert cli(base + ["create", "--name", "eve"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(base + ["create", "--name", "x", "--endpoints", "nope"]) == 2
    assert "unknown endpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --token-quota and --budget exclude each other
        cli(base + ["create", "--name", "y", "--token-quota", "5", "--budget", "1"])
    assert cli(base + ["usage"]) == 0
    assert capsys.readouterr().out.split() == ["key", "day", "model", "requests", "input",
                                               "output", "cost_usd"]
