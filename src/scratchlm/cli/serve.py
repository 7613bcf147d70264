"""Serve a model over an OpenAI-compatible HTTP API, batching concurrent requests.

Point any OpenAI client at http://HOST:PORT/v1 (the api key is ignored): POST /v1/completions and
/v1/chat/completions (streaming too), GET /v1/models, /health and /openapi.json.  Requests join a
running batch between decode steps; beyond --max-batch running and --max-queue waiting requests
the server answers 429.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.cli.options import add_model_options, load_model
from scratchlm.serving.engine import PREFILL_TOKENS


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes the server to the network")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--model-name", default=None,
                        help="the id clients pass as 'model'; None = the model file or directory name")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="most requests waiting for a slot; more are refused with HTTP 429")
    parser.add_argument("--max-tokens-limit", type=int, default=None,
                        help="the largest max_tokens a request may ask for; None = the context length")
    parser.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, metavar="N",
                        help="most prompt tokens (padded) read in one step between two decode steps: "
                        "larger reads newcomers' prompts sooner, smaller keeps running answers flowing")
    parser.set_defaults(func=run)


def check_address(host: str, port: int) -> None:
    """Raise a ``UserError`` unless a server can listen on host:port now (a port in use, out of
    range, or a host that is not this machine's)."""
    import socket

    from scratchlm.errors import UserError

    if not 1 <= port <= 65535:
        raise UserError(f"port {port} is out of range", "pass a --port from 1 to 65535 (8000 by default)")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        reason = (err.strerror or str(err)).split(" (while attempting")[0]  # create_server's addition
        raise UserError(f"cannot listen on {host}:{port}: {reason}",
                        "pass another --port (or --host), or stop the program that uses it") from None


def run(args: argparse.Namespace) -> int:
    from scratchlm.errors import UserError

    try:
        import uvicorn

        from scratchlm.serving.openai_server import ServerConfig, create_app
    except ImportError as err:
        raise UserError(f"the server needs {err.name}, which is not installed",
                        "pip install fastapi uvicorn") from err

    if args.max_batch < 1 or args.max_queue < 0 or args.prefill_tokens < 1:
        raise UserError("--max-batch and --prefill-tokens must be ≥ 1 and --max-queue ≥ 0",
                        "pass positive sizes")
    check_address(args.host, args.port)  # before the model loads, which may take a while
    lm = load_model(args)
    name = args.model_name or Path(str(args.model).rstrip("/")).stem
    config = ServerConfig(name, max_batch=args.max_batch, max_queue=args.max_queue,
                          max_tokens_limit=args.max_tokens_limit, prefill_tokens=args.prefill_tokens)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(lm, config), host=args.host, port=args.port, log_level="info")
    return 0
