"""Claim: continuous batching serves 8 concurrent clients ≥ 3x faster (aggregate output tokens/s)
than the same 8 requests sent one after another.

Starts ``scratchlm serve``'s app in this process on 127.0.0.1, sends 8 streaming chat requests
with the official ``openai`` client (temperature 0, a fixed number of tokens each via
``ignore_eos``), first one at a time, then all at once, and prints aggregate output tokens/s,
p50/p95 time to first token and peak resident memory.  The model is SmolLM2-135M-Instruct from
../shared/models when present, else a tiny random Llama (the report says which).

On a shared machine the load changes from minute to minute: ``--rounds N`` alternates the two
phases N times and reports the median speed-up too, and the load average is printed beside the
figures.

    .venv/bin/python benchmarks/serving.py [--model REF] [--dtype gguf] [--tokens 64] [--clients 8]
                                           [--threads N] [--rounds 1]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "How do birds fly?",
             "Write a haiku about rain.", "What is 12 times 7?", "Why is the sky blue?",
             "Give me a tip for learning Python.", "What does a compiler do?"]


def load_model(ref: str | None, dtype: str | None = None):
    from scratchlm.api import LM, load

    if ref or SMOLLM2.exists():
        path = ref or str(SMOLLM2)
        return load(path, device="cpu", dtype=dtype), Path(path).name + (f" ({dtype})" if dtype else "")
    from scratchlm.models import build_model, from_preset
    from scratchlm.tokenizers.train_bpe import train_bpe

    tokenizer = train_bpe((REPO / "src/scratchlm/generation/generate.py").read_text(), 300,
                          special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    config = from_preset("tiny-llama", vocab_size=300, context_length=512)
    return LM(build_model(config), tokenizer, config), "tiny-llama (random weights; SmolLM2 GGUF absent)"


def one_request(client, question: str, tokens: int, extra: dict) -> tuple[float, float, int]:
    """(time to first token, end time, completion tokens) of one streaming chat request."""
    start = time.perf_counter()
    first = None
    usage = 0
    stream = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=tokens,
        stream=True, stream_options={"include_usage": True}, **extra)
    pieces = 0  # content chunks: the token count of a server that sends no usage (llama.cpp's)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            pieces += 1
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter(), usage or pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model ref; None = SmolLM2 GGUF if present")
    parser.add_argument("--dtype", default=None,
                        help="load's dtype, e.g. gguf (the file's blocks packed) or float16; None = fp32")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; None = torch's default")
    parser.add_argument("--rounds", type=int, default=1, help="times to run both phases, alternating")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="then the same requests against llama-cpp-python's server (pip install "
                        "'llama-cpp-python[server]'), the side-by-side peer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from scratchlm.serving.openai_server import ServerConfig, ServerThread

    lm, name = load_model(args.model, args.dtype)
    questions = (QUESTIONS * (args.clients // len(QUESTIONS) + 1))[:args.clients]
    load_before = os.getloadavg()[0]
    # ignore_eos: every answer runs to max_tokens, so both phases make the same tokens
    with ServerThread(lm, ServerConfig("bench", max_batch=args.clients)) as server:
        rounds = measure(server.url, questions, args, {"extra_body": {"ignore_eos": True}})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model: {name}; {args.clients} requests × {args.tokens} tokens; "
          f"torch threads {torch.get_num_threads()}; load average (1 min) {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    report("scratchlm serve", rounds)
    print(f"peak resident memory: {peak_mib:.0f} MiB")
    if args.llama_cpp:
        peer(args, questions)


def measure(url: str, questions: list[str], args: argparse.Namespace, extra: dict) -> list:
    """Both phases, ``args.rounds`` times: [((rows, wall) sequential, (rows, wall) concurrent), ...]."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    one_request(client, "warm up", 4, extra)
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        sequential = [one_request(client, q, args.tokens, extra) for q in questions]
        seq_time = time.perf_counter() - start
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            together = list(pool.map(lambda q: one_request(client, q, args.tokens, extra), questions))
        rounds.append(((sequential, seq_time), (together, time.perf_counter() - start)))
    return rounds


def report(title: str, rounds: list) -> None:
    def pct(values: list[float], q: int) -> float:
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

    print(f"{title:<16}{'tokens/s':>10}{'TTFT p50 ms':>13}{'TTFT p95 ms':>13}{'wall s':>9}{'tokens':>8}")
    speedups = []
    for number, phases in enumerate(rounds, 1):
        if len(rounds) > 1:
            print(f"round {number}")
        tps = []
        for label, (rows, wall) in zip(("sequential", "concurrent"), phases, strict=True):
            tokens = sum(t for _, _, t in rows)
            tps.append(tokens / wall)
            ttft = [r[0] * 1000 for r in rows]
            print(f"{label:<16}{tps[-1]:>10.1f}{pct(ttft, 50):>13.0f}{pct(ttft, 95):>13.0f}{wall:>9.2f}"
                  f"{tokens:>8}")
        speedups.append(tps[1] / tps[0])
        print(f"speed-up (aggregate tokens/s, concurrent / sequential): {speedups[-1]:.2f}x (target ≥ 3x)")
    if len(rounds) > 1:
        print(f"median speed-up over {len(rounds)} rounds: {statistics.median(speedups):.2f}x "
              f"(each: {', '.join(f'{x:.2f}' for x in speedups)})")


def peer(args: argparse.Namespace, questions: list[str]) -> None:
    """The same requests against llama-cpp-python's OpenAI server on the SmolLM2 file, same threads."""
    import socket
    import subprocess
    import tempfile
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = str(torch.get_num_threads())
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(args.model or SMOLLM2),
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", threads,
               "--n_threads_batch", threads, "--n_ctx", "4096", "--verbose", "False",
               "--interrupt_requests", "False"]  # queue concurrent requests; by default a new one cancels
    log = tempfile.TemporaryFile("w+")  # (a file, not a pipe: a full pipe would stall the server)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1)
                break
            except OSError:
                if server.poll() is not None:  # it exited: say why instead of timing out
                    log.seek(0)
                    reason = log.read().strip().splitlines()
                    print(f"llama.cpp server did not start: {reason[-1] if reason else server.returncode} "
                          "(pip install 'llama-cpp-python[server]')")
                    return
                time.sleep(0.1)
        # its eos (<|im_end|>, id 2 in SmolLM2) banned: the answers run to max_tokens, as ours
        rounds = measure(url, questions, args, {"logit_bias": {"2": -100}})
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    report("llama.cpp server", rounds)


if __name__ == "__main__":
    sys.exit(main())
