"""The `engine` command: generate text, convert GGUF files, serve, manage API keys."""

from __future__ import annotations

import argparse
import sys

from engine.model.registry import DEFAULT_MODEL
from engine.server.cli import add_server_commands


def _generate(args) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(args.model, max_model_len=args.max_model_len, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, max_tokens=args.max_tokens, seed=args.seed,
                            stop=args.stop or None)
    prompt = args.prompt
    if args.chat:
        tok = llm.get_tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}
    else:
        sys.stdout.write(prompt)
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _convert(args) -> int:
    from engine.model.convert import convert_gguf

    convert_gguf(args.gguf, args.out_dir)
    print(f"wrote a Hugging Face folder to {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt, streaming the text")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help="Hugging Face folder, .gguf file or packaged model name")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--quantization", choices=["q8_0", "q4_0", "q4_1"], default=None,
                     help="quantise the model's float weights at load (GGUF files run their "
                          "stored blocks natively without it)")
    gen.add_argument("--kv-cache-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                     default="auto", help="16-bit caches halve the bytes decode reads")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="write a GGUF file as a Hugging Face folder")
    conv.add_argument("gguf")
    conv.add_argument("out_dir")
    conv.set_defaults(func=_convert)

    add_server_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"engine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
