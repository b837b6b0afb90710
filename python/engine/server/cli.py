"""`engine serve` and `engine keys ...` (registered by engine.cli).

Imports of the server stack happen inside the handlers, so that `engine generate` never
loads FastAPI.
"""

from __future__ import annotations

import argparse
import json

from engine.model.registry import DEFAULT_MODEL

_ENGINE_ARGS = {"max_model_len": int, "num_kv_blocks": int, "kv_cache_gib": float,
                "max_num_seqs": int, "max_num_batched_tokens": int, "block_size": int,
                "kv_cache_dtype": str}


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_server_commands(sub) -> None:
    """Add the `serve` and `keys` subcommands to an argparse subparsers object."""
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help="Hugging Face folder, .gguf file or packaged model name")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the name clients send as 'model'")
    _data_dir(serve)
    serve.add_argument("--api-key", help="a single static key (besides stored keys)")
    serve.add_argument("--price-table", help="JSON file: model -> input/output USD per million")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20)
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests queued beyond --max-num-seqs before 503")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on SIGTERM")
    serve.add_argument("--access-log", help="file for the JSON access log (default stderr)")
    serve.add_argument("--log-prompts", action="store_true",
                       help="include prompt and completion text in the access log")
    for name, kind in _ENGINE_ARGS.items():
        serve.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="manage API keys and read usage")
    _data_dir(keys)
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key and print its secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--models", type=_csv, help="comma-separated models (default: all)")
    create.add_argument("--endpoints", type=_csv,
                        help="comma-separated: completions,chat,embeddings,tokenize,models")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    quota = create.add_mutually_exclusive_group()
    quota.add_argument("--token-quota", type=int, help="total tokens, input + output")
    quota.add_argument("--budget", type=float, help="total USD under the price table")
    create.set_defaults(func=_keys_create)
    ksub.add_parser("list", help="list keys (never their secrets)").set_defaults(func=_keys_list)
    for name, func, text in (("revoke", _keys_revoke, "revoke a key at once"),
                             ("rotate", _keys_rotate, "give a key a new secret")):
        p = ksub.add_parser(name, help=text)
        p.add_argument("name")
        p.set_defaults(func=func)
    usage = ksub.add_parser("usage", help="the usage ledger by key, day and model")
    usage.add_argument("name", nargs="?", help="one key (default: all)")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(func=_keys_usage)


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="where engine.db lives (default: $ENGINE_DATA_DIR or "
                             "~/.local/share/engine)")


def _serve(args) -> int:
    from engine.server.config import ServerConfig
    from engine.server.serve import run_server

    engine_kwargs = {k: getattr(args, k) for k in _ENGINE_ARGS if getattr(args, k) is not None}
    config = ServerConfig(
        model=args.model, served_model_name=args.served_model_name, host=args.host,
        port=args.port, api_key=args.api_key, price_table=args.price_table,
        max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
        shutdown_timeout_s=args.shutdown_timeout, access_log=args.access_log,
        log_prompts=args.log_prompts, engine_kwargs=engine_kwargs,
        **({"data_dir": args.data_dir} if args.data_dir else {}))
    run_server(config)
    return 0


def _store(args):
    from engine.server.db import connect, default_data_dir
    from engine.server.keys import KeyStore
    from engine.server.ledger import Ledger

    conn = connect(args.data_dir or default_data_dir())
    return KeyStore(conn), Ledger(conn)


def _keys_create(args) -> int:
    keys, _ = _store(args)
    key, secret = keys.create(args.name, models=args.models, endpoints=args.endpoints,
                              rpm=args.rpm, tpm=args.tpm, token_quota=args.token_quota,
                              budget_usd=args.budget)
    print(f"created key {key.name!r}; its secret is shown only this once:\n{secret}")
    return 0


def _keys_list(args) -> int:
    keys, _ = _store(args)
    for key in keys.list():
        print(json.dumps(key.describe()))
    return 0


def _keys_revoke(args) -> int:
    keys, _ = _store(args)
    key = keys.revoke(args.name)
    print(f"revoked key {key.name!r} at {key.revoked_at}")
    return 0


def _keys_rotate(args) -> int:
    keys, _ = _store(args)
    key, secret = keys.rotate(args.name)
    print(f"rotated key {key.name!r}; the old secret no longer works. New secret:\n{secret}")
    return 0


def _keys_usage(args) -> int:
    _, ledger = _store(args)
    rows = ledger.rows(args.name)
    if args.json:
        print(json.dumps(rows))
        return 0
    header = ("key", "day", "model", "requests", "input", "output", "cost_usd")
    table = [header] + [(r["key_name"], r["day"], r["model"], str(r["num_requests"]),
                         str(r["input_tokens"]), str(r["output_tokens"]),
                         f"{r['cost_usd']:.6f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
