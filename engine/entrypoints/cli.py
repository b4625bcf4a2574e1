"""`litmus serve MODEL ...`: the OpenAI-compatible server from the command line.

harness/cli.py hooks this in with add_serve_parser(subparsers), which sets `run` on the
parsed namespace, as its other subcommands do; serve_main(argv) and
`python -m engine.entrypoints.cli MODEL ...` run it without the harness.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine.entrypoints.openai.protocol import DEFAULT_MAX_REQUEST_BYTES

API_KEY_ENV = "LITMUS_API_KEY"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a zoo name, a local HF directory or .gguf, or a hub id "
                                                       "in the local HF cache")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    server.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    server.add_argument("--served-model-name", nargs="+", metavar="NAME",
                        help="names clients use in `model` (default: MODEL as given)")
    server.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})")
    server.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE",
                        help="a Jinja chat template, or a file holding one (default: the tokenizer's)")
    server.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger request bodies get 413 (default: %(default)s)")
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    eng = parser.add_argument_group("engine")
    eng.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    eng.add_argument("--task", default="auto",
                     help="what the model serves: generate, or a pooling task such as embed (default: %(default)s)")
    eng.add_argument("--model-impl", default="auto",
                     help="auto (native when there is one), native or transformers (default: %(default)s)")
    eng.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s)")
    eng.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    eng.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch (default: %(default)s)")
    eng.add_argument("--max-num-batched-tokens", type=int, help="tokens per step (default: the engine's)")
    eng.add_argument("--num-kv-blocks", type=int, help="KV cache size in blocks (default: from memory)")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    eng.add_argument("--enable-prefix-caching", action="store_true", help="reuse KV blocks of shared prefixes")
    eng.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling requests (default: %(default)s)")
    eng.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                     help="--no-enforce-eager: decode steps run as the graph torch.compile captures on the "
                     "first (default: eager)")
    eng.add_argument("--trust-remote-code", action="store_true")
    eng.add_argument("--revision")


def add_serve_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                   description="Serve MODEL over an OpenAI-compatible HTTP API.")
    add_serve_arguments(parser)
    parser.set_defaults(run=run_serve)
    return parser


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="litmus serve", description="Serve MODEL over an OpenAI-compatible HTTP API.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


def run_serve(args: argparse.Namespace) -> int:
    # Imported here so `litmus --help` does not pay for torch, transformers and FastAPI.
    import uvicorn

    from engine.config import EngineConfig
    from engine.core.async_engine import AsyncLLMEngine
    from engine.entrypoints.openai.api_server import ServerSettings, build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.max_request_bytes < 1:
        return _fail(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    try:
        chat_template = _read_template(args.chat_template)
        config = EngineConfig.create(
            model=_resolve_model(args.model), tokenizer=args.tokenizer, task=args.task, dtype=args.dtype,
            seed=args.seed, model_impl=args.model_impl,
            max_model_len=args.max_model_len, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=args.enable_prefix_caching, trust_remote_code=args.trust_remote_code,
            revision=args.revision, enforce_eager=args.enforce_eager,
        )
        engine = AsyncLLMEngine.from_config(config)
    except (ValueError, OSError) as exc:
        # A bad model or option is the user's to fix: one line, not a traceback.
        return _fail(str(exc))
    settings = ServerSettings(
        served_model_names=args.served_model_name or [args.model], api_key=args.api_key or None,
        chat_template=chat_template, max_request_bytes=args.max_request_bytes,
    )
    logging.getLogger(__name__).info(
        "serving %s as %s: max_model_len=%d, %d KV blocks of %d tokens", config.model,
        settings.served_model_names, config.max_model_len, config.num_kv_blocks, config.block_size,
    )
    uvicorn.run(build_app(engine, settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0


def _fail(message: str) -> int:
    print(f"litmus serve: error: {message}", file=sys.stderr)
    return 1


def _resolve_model(model: str) -> str:
    """Zoo names become their built directories (the zoo lives in the harness, which may be absent)."""
    try:
        from harness.zoo import ZooUnavailableError, resolve
    except ImportError:
        return model
    try:
        return resolve(model)
    except ZooUnavailableError as exc:
        raise ValueError(str(exc)) from exc


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    # A Jinja template always has "{" in it; a path to one normally does not.
    if "{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return path.read_text()


if __name__ == "__main__":
    sys.exit(serve_main())
