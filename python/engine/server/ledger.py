"""Usage: the ledger (per key, model and UTC day) and the price table that costs it.

Price table file (JSON), prices in USD per million tokens:

    {"SmolLM2-135M-Instruct": {"input_per_million": 0.10, "output_per_million": 0.20},
     "*": {"input_per_million": 0.0, "output_per_million": 0.0}}

"*" prices every model not listed; without it an unlisted model costs nothing.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone

from engine.server.db import transaction

_PRICE_FIELDS = {"input_per_million", "output_per_million"}


@dataclass(frozen=True)
class Price:
    input_per_million: float
    output_per_million: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_million
                + output_tokens * self.output_per_million) / 1e6


class PriceTable:
    """Model name -> Price.

    Args:
        prices: model name (or "*") -> Price.
    """

    def __init__(self, prices: dict[str, Price] | None = None):
        self.prices = dict(prices or {})

    @classmethod
    def load(cls, path: str) -> PriceTable:
        """Read a price table file.

        Raises:
            ValueError: unreadable file, bad JSON, or an entry that is not
                {"input_per_million": number >= 0, "output_per_million": number >= 0}.
        """
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"price table {path}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"price table {path}: expected an object of model -> prices")
        prices = {}
        for model, entry in data.items():
            if not isinstance(entry, dict) or set(entry) != _PRICE_FIELDS or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                    for v in entry.values()):
                raise ValueError(f"price table {path}: {model!r} must be exactly "
                                 '{"input_per_million": <number >= 0>, "output_per_million": '
                                 f"<number >= 0>}}, got {entry!r}")
            prices[model] = Price(float(entry["input_per_million"]),
                                  float(entry["output_per_million"]))
        return cls(prices)

    def price(self, model: str) -> Price:
        return self.prices.get(model) or self.prices.get("*") or Price(0.0, 0.0)

    def has_price(self, model: str) -> bool:
        return model in self.prices or "*" in self.prices

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        return self.price(model).cost(input_tokens, output_tokens)


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


class Ledger:
    """The usage table.

    Args:
        conn: a connection from engine.server.db.connect.
    """

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def record(self, key_name: str, model: str, input_tokens: int, output_tokens: int,
               cost_usd: float, day: str | None = None) -> None:
        """Add one request's usage to its (key, model, day) row, in one transaction."""
        with transaction(self.conn):
            self.conn.execute(
                "INSERT INTO usage (key_name, model, day, num_requests, input_tokens, "
                "output_tokens, cost_usd) VALUES (?, ?, ?, 1, ?, ?, ?) "
                "ON CONFLICT (key_name, model, day) DO UPDATE SET "
                "num_requests = num_requests + 1, "
                "input_tokens = input_tokens + excluded.input_tokens, "
                "output_tokens = output_tokens + excluded.output_tokens, "
                "cost_usd = cost_usd + excluded.cost_usd",
                (key_name, model, day or today(), input_tokens, output_tokens, cost_usd))

    def totals(self, key_name: str) -> tuple[int, float]:
        """(input + output tokens, cost in USD) of a key over all time."""
        row = self.conn.execute(
            "SELECT COALESCE(SUM(input_tokens + output_tokens), 0), COALESCE(SUM(cost_usd), 0) "
            "FROM usage WHERE key_name = ?", (key_name,)).fetchone()
        return int(row[0]), float(row[1])

    def rows(self, key_name: str | None = None) -> list[dict]:
        """Ledger rows (a key's, or everyone's), by key, day and model."""
        query = "SELECT * FROM usage"
        args: tuple = ()
        if key_name is not None:
            query, args = query + " WHERE key_name = ?", (key_name,)
        rows = self.conn.execute(query + " ORDER BY key_name, day, model", args)
        return [dict(r) for r in rows]

    def totals_by_key_model(self) -> list[dict]:
        """All-time sums per (key, model), for /metrics."""
        rows = self.conn.execute(
            "SELECT key_name, model, SUM(num_requests) AS num_requests, SUM(input_tokens) AS "
            "input_tokens, SUM(output_tokens) AS output_tokens, SUM(cost_usd) AS cost_usd "
            "FROM usage GROUP BY key_name, model")
        return [dict(r) for r in rows]
