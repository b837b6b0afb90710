"""An OpenAI-compatible HTTP server with API keys, scopes, rate limits, quotas and usage.

    engine serve [MODEL] --port 8000
    engine keys create --name alice --rpm 60 --tpm 20000 --token-quota 1000000

The pieces: protocol (request schemas), body (reading and validating bodies), auth and keys
(who may call), limits (rate limits, quotas, capacity), ledger (usage and prices),
generation / completions / routes (the endpoints), access_log and metrics (observability),
app (assembly) and serve (uvicorn, signals).
"""

from engine.server.config import ServerConfig

__all__ = ["ServerConfig"]
