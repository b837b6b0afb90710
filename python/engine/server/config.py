"""The server's settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.model.registry import DEFAULT_MODEL
from engine.server.db import default_data_dir


@dataclass
class ServerConfig:
    """Args:
        model: a Hugging Face folder, a .gguf file, or a packaged model's name.
        served_model_name: the name clients send as "model" (default: from `model`).
        host, port: where to listen.
        data_dir: holds engine.db (keys and the usage ledger).
        api_key: a single static key accepted besides the stored ones.
        price_table: a JSON price table file (see engine.server.ledger).
        max_body_bytes: larger request bodies get 413.
        max_queue: requests admitted beyond the engine's max_num_seqs before 503.
        shutdown_timeout_s: on SIGTERM, how long in-flight requests may take to finish
            before they are aborted.
        access_log: a file for the JSON access lines (default: stderr).
        log_prompts: put prompt and completion text in the access log.
        engine_kwargs: EngineConfig fields (max_model_len, num_kv_blocks, ...).
    """
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = field(default_factory=default_data_dir)
    api_key: str | None = None
    price_table: str | None = None
    max_body_bytes: int = 4 << 20
    max_queue: int = 256
    shutdown_timeout_s: float = 30.0
    access_log: str | None = None
    log_prompts: bool = False
    engine_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in [0, 65535], got {self.port!r}")
        for name in ("max_body_bytes", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be a positive integer, got {value!r}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"ServerConfig.shutdown_timeout_s must be >= 0, "
                             f"got {self.shutdown_timeout_s!r}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("ServerConfig.api_key must be at least 8 characters")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("ServerConfig.served_model_name must not be blank")
