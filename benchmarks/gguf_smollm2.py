"""GGUF speed: SmolLM2-135M-Instruct (Q4_1) run by scratchlm packed, in fp16, and by llama.cpp.

Every side opens the same ``.gguf`` file.  ``scratchlm-gguf`` is ``scratchlm.load(path,
dtype="gguf")``: the file's Q4_1 (and Q8_0 embedding) blocks kept as they are and multiplied in
place (``scratchlm.quant``) with its default int15 activations, each decoded token one call
through every layer (``quant.decode``), the prefill an integer matrix product;
``scratchlm-gguf-eager`` (``--modes gguf-eager``) the same model decoding through its own layers
one operation at a time (``decode_step`` off); ``scratchlm-gguf-int8`` and ``scratchlm-gguf-fp32``
(``--modes gguf-int8,gguf-fp32``) with llama.cpp's int8 rounding and with exact fp32 activations
(``quant.linear.ACTIVATIONS``, set around each of their runs; fp32 decodes eagerly);
``scratchlm-fp16`` is ``dtype="float16"`` (fp16 weights packed by
FBGEMM, fp32 arithmetic: ``scratchlm.generation.packed``); ``scratchlm`` the default fp32 load;
``transformers`` is ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` + ``generate``
in fp32; ``llama.cpp`` is llama-cpp-python when installed.  Batch 1, greedy.  Figures:

* load: wall time of the load call in a fresh process, as a user's first load is (``import torch``
  and ``import transformers`` excluded; scratchlm's includes the tokenizer);
* resident memory: that fresh process's resident set size (``VmRSS``) right after loading, above
  its size before the load (interpreter and torch imported), beside the file's size; and its peak
  (``VmHWM``) after loading and making 8 tokens;
* decode: tokens/s of the cached decode loop, 1 / the median time between consecutive new tokens
  (timestamps from our token iterator and from a transformers streamer), so neither the prefill
  nor a burst of noise from a neighbour is in it; eos is ignored so every run makes all 96 tokens.
  The end-to-end rate, 96 / the whole call, is printed beside it, and so is the rate in CPU time
  (1 / the median CPU seconds of this process per token): with one thread on shared cores that
  one leaves out the time a neighbour held the core, so it moves less with the load average;
* prefill: tokens/s for a 512-token prompt (one call that makes one new token).

Decode and prefill run in this process, all models loaded, each figure the median over rounds
that alternate the sides, so a noisy neighbour on the shared cores slows them alike.  When
``llama-cpp-python`` is installed it runs as a side (greedy, as many threads as torch); it is a
benchmark extra, not a dependency (it builds from source: ``pip install llama-cpp-python``).
Without it the output says that llama.cpp is absent and compares the packed path with fp16.

``--kernels`` times the packed matrix products alone instead: each of the file's matrices (in a
token's order, all of them once per pass, so the weights come from memory as they do when
decoding) with one token of random activations, through the compiled kernels with int15, int8 and
fp32 activations; per shape the median over passes of this thread's CPU time, in µs per token, ns
and cycles per block of 32 weights (the clock measured by a chain of dependent adds).

    python benchmarks/gguf_smollm2.py --threads 2 --no-transformers      # packed vs fp16 vs llama.cpp
    python benchmarks/gguf_smollm2.py --threads 2 --modes gguf,fp16,fp32  # and transformers
    python benchmarks/gguf_smollm2.py --threads 1 --no-transformers --modes gguf,gguf-fp32,fp16
    python benchmarks/gguf_smollm2.py --threads 1 --kernels --rounds 21
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Tell me a long story about a lighthouse keeper and a storm."
FIXED_TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"  # for max |Δlogit|
MODES = {"gguf": "scratchlm-gguf", "gguf-eager": "scratchlm-gguf-eager", "gguf-int8": "scratchlm-gguf-int8",
         "gguf-fp32": "scratchlm-gguf-fp32", "fp16": "scratchlm-fp16", "fp32": "scratchlm"}  # --modes → side
SIDES = (*MODES.values(), "transformers", "llama.cpp")

# (prompt ids, new tokens) -> (tokens, (wall, CPU) time of each new token)
Run = Callable[[list[int], int], tuple[list[int], list[tuple[float, float]]]]


def rss_mib(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process, MiB; 0 where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load(side: str, path: Path) -> tuple[float, Run, Any]:
    """(load seconds, run, scratchlm LM or None) for one side; imports happen before the clock starts."""
    if side.startswith("scratchlm"):
        import scratchlm
        from scratchlm.generation import SamplingParams, TokenGenerator
        from scratchlm.quant import linear

        dtype = "gguf" if side.startswith("scratchlm-gguf") else {"scratchlm-fp16": "float16"}.get(side)
        activations = side_activations(side)
        seconds, lm = timed(lambda: scratchlm.load(path, device="cpu", dtype=dtype))
        if side == "scratchlm-gguf-eager":
            lm.model.decode_step = None

        def run(prompt: list[int], n: int) -> tuple[list[int], list[tuple[float, float]]]:
            params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
            tokens, stamps = [], []
            default = linear.ACTIVATIONS
            linear.ACTIVATIONS = activations or default
            try:
                for event in TokenGenerator(lm.model, [prompt], params, eos_id=lm.tokenizer.eos_id):
                    tokens.append(event.token_id)
                    stamps.append((time.perf_counter(), time.process_time()))
            finally:
                linear.ACTIVATIONS = default
            return tokens, stamps

        return seconds, run, lm

    if side == "llama.cpp":
        return load_llama_cpp(path)
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        """Records when each new token arrives (``put`` is first called with the prompt)."""

        def __init__(self) -> None:
            self.calls: list[tuple[float, float]] = []

        def put(self, value: torch.Tensor) -> None:
            self.calls.append((time.perf_counter(), time.process_time()))

        def end(self) -> None:
            pass

    seconds, model = timed(lambda: AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval())

    def run_hf(prompt: list[int], n: int) -> tuple[list[int], list[tuple[float, float]]]:
        ids, stamps = torch.tensor([prompt]), Stamps()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, streamer=stamps)
        return out[0, len(prompt):].tolist(), stamps.calls[1:]

    return seconds, run_hf, None


def side_activations(side: str) -> str | None:
    """The activations rounding a packed side sets ("int8", "fp32"); None: the default (or not packed)."""
    mode = side.removeprefix("scratchlm-gguf-")
    return mode if side.startswith("scratchlm-gguf-") and mode != "eager" else None


def logit_drift(lms: dict[str, Any], path: Path) -> None:
    """Max |Δlogit| of each packed side against the dequantized fp32 model on FIXED_TEXT, token by
    token through the cache (each step a decode step, so it goes through the decode kernels)."""
    import scratchlm
    from scratchlm.quant import linear

    plain = scratchlm.load(path, device="cpu")
    ids = torch.tensor([plain.tokenizer.encode(FIXED_TEXT)])
    cells, scale = [], 0.0
    for name, lm in lms.items():
        if not name.startswith("scratchlm-gguf"):
            continue
        default = linear.ACTIVATIONS
        activations = side_activations(name) or default
        linear.ACTIVATIONS = activations
        try:
            with torch.no_grad():
                n = ids.shape[1]
                cache, ref_cache, drift = lm.model.new_cache(1, n), plain.model.new_cache(1, n), 0.0
                for i in range(n):
                    reference = plain.model(ids[:, i:i + 1], cache=ref_cache)
                    step = lm.model(ids[:, i:i + 1], cache=cache)
                    drift = max(drift, (step - reference).abs().max().item())
                    scale = max(scale, reference.abs().max().item())
        finally:
            linear.ACTIVATIONS = default
        cells.append(f"{name} ({activations}) {drift:.3g}")
    if cells:
        print(f"max |Δlogit| against the dequantized fp32 model, {ids.shape[1]}-token fixed text token by "
              f"token: {', '.join(cells)} (max |logit| {scale:.3g})")


def load_llama_cpp(path: Path) -> tuple[float, Run, Any]:
    """llama-cpp-python on the same file, greedy (top-k 1), with as many threads as torch has."""
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    seconds, llm = timed(lambda: Llama(model_path=str(path), n_ctx=2048, n_threads=threads,
                                       n_threads_batch=threads, verbose=False))

    def run(prompt: list[int], n: int) -> tuple[list[int], list[tuple[float, float]]]:
        tokens, stamps = [], []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            stamps.append((time.perf_counter(), time.process_time()))
            if len(tokens) == n:
                break
        return tokens, stamps

    return seconds, run, None


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def child(side: str, path: Path) -> int:
    """Fresh-process figures for one side: load time and peak RSS; one JSON line on stdout."""
    if side == "transformers":
        import transformers  # noqa: F401
    elif side == "llama.cpp":
        import llama_cpp  # noqa: F401
    else:
        import scratchlm  # noqa: F401
    before = rss_mib("VmRSS")
    seconds, run, _ = load(side, path)
    resident = rss_mib("VmRSS") - before
    run(list(range(1, 44)), 8)
    print(json.dumps({"load_s": seconds, "rss_mib": resident, "peak_mib": rss_mib("VmHWM") - before}))
    return 0


def fresh_process(side: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", side, "--path", str(args.path)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DEFAULT, help="the SmolLM2 .gguf file")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--modes", default="gguf,fp16",
                        help="scratchlm weight modes to run, comma-separated: gguf (dtype='gguf', the file's "
                        "blocks packed, int15 activations, a decoded token in one call), gguf-eager (the "
                        "same, decoding one operation at a time), gguf-int8 and gguf-fp32 (int8 or exact "
                        "fp32 activations), fp16 (dtype='float16'), fp32 (default load)")
    parser.add_argument("--kernels", action="store_true",
                        help="time the packed matrix products alone (int15, int8, fp32 activations), "
                        "--rounds passes over the file's matrices")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers (each load 30+ s)")
    parser.add_argument("--no-llama-cpp", action="store_true",
                        help="skip llama-cpp-python (run when it is installed: the side-by-side ceiling)")
    parser.add_argument("--no-fresh", action="store_true",
                        help="skip the fresh-process load time and peak memory (transformers loads once)")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.path.is_file():
        print(f"error: {args.path} not found — pass --path to SmolLM2-135M-Instruct.Q4_1.gguf",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.path)
    if args.kernels:
        return kernel_figures(args.path, args.rounds, args.prefill_tokens)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        print(f"error: --modes takes {', '.join(MODES)}, got {args.modes!r}", file=sys.stderr)
        return 2
    names = [MODES[m] for m in modes]
    names += ["transformers"] * (not args.no_transformers)
    llama_cpp = not args.no_llama_cpp and llama_cpp_available()
    names += ["llama.cpp"] * llama_cpp
    if not llama_cpp:
        print("llama.cpp: absent (" + ("--no-llama-cpp" if args.no_llama_cpp else
                                       "llama-cpp-python is not installed") + "); no figure for it")
    file_mib = args.path.stat().st_size / 2**20
    print(f"load average at start: {load_average()}; {args.path.name}: {file_mib:.0f} MiB", flush=True)
    fresh = {}
    for name in names:
        if args.no_fresh:
            fresh[name] = {}  # not measured: shown as "-"
            continue
        fresh[name] = fresh_process(name, args)
        print(f"{name}: load in a fresh process {fresh[name]['load_s']:.2f} s, resident after load "
              f"+{fresh[name]['rss_mib']:.0f} MiB ({fresh[name]['rss_mib'] / file_mib:.2f}x the file), "
              f"peak +{fresh[name]['peak_mib']:.0f} MiB", flush=True)

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from scratchlm.data.corpora import read_corpus

    runs: dict[str, Run] = {}
    lms: dict[str, Any] = {}
    lm = None
    for name in names:
        _, runs[name], loaded = load(name, args.path)
        lm = lm or loaded
        lms[name] = loaded
        runs[name]([1, 2, 3], 4)  # warm-up: allocator, thread pool, lazy imports
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    chat = env.from_string(lm.chat_template).render(messages=[{"role": "user", "content": QUESTION}],
                                                    add_generation_prompt=True)
    prompt = lm.tokenizer.encode(chat, allowed_special="all")
    long_prompt = lm.tokenizer.encode(read_corpus("builtin:the-verdict"))[:args.prefill_tokens]
    n = args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_average()}; "
          f"{args.path.name}; {len(prompt)}-token chat prompt, {n} new tokens, greedy, batch 1; "
          f"prefill {len(long_prompt)} tokens", flush=True)

    decode: dict[str, list[float]] = {name: [] for name in names}
    decode_cpu: dict[str, list[float]] = {name: [] for name in names}
    end_to_end: dict[str, list[float]] = {name: [] for name in names}
    prefill: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for name, run in runs.items():
            seconds, (tokens[name], stamps) = timed(lambda run=run: run(prompt, n))
            for k, rates in ((0, decode[name]), (1, decode_cpu[name])):
                gaps = [b[k] - a[k] for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
                rates.append(1 / max(statistics.median(gaps), 1e-9))
            end_to_end[name].append(n / seconds)
            prefill[name].append(len(long_prompt) / timed(lambda run=run: run(long_prompt, 1))[0])
        print(f"round {r + 1} (load average {load_average()}): " + ", ".join(
            f"{name} decode {decode[name][-1]:.1f} tok/s ({end_to_end[name][-1]:.1f} end to end, "
            f"{decode_cpu[name][-1]:.1f} per CPU s), prefill {prefill[name][-1]:.0f} tok/s"
            for name in names), flush=True)

    med = {name: {"decode": statistics.median(decode[name]), "cpu": statistics.median(decode_cpu[name]),
                  "e2e": statistics.median(end_to_end[name]), "prefill": statistics.median(prefill[name])}
           for name in names}
    print(f"\n{'':>15} {'load s':>7} {'decode tok/s':>13} {'end to end':>11} {'per CPU s':>10} "
          f"{'prefill tok/s':>14} {'RSS +MiB':>9} {'peak +MiB':>10}")
    for name in names:
        m, f = med[name], fresh[name]
        load_s, rss, peak = (("-" if f.get(k) is None else f"{f[k]:.{d}f}")
                             for k, d in (("load_s", 2), ("rss_mib", 0), ("peak_mib", 0)))
        print(f"{name:>15} {load_s:>7} {m['decode']:13.1f} {m['e2e']:11.1f} {m['cpu']:10.1f} "
              f"{m['prefill']:14.0f} {rss:>9} {peak:>10}")
    first = names[0]
    for name in names[1:]:
        same = sum(a == b for a, b in zip(tokens[first], tokens[name], strict=True))
        print(f"greedy tokens identical, {first} vs {name}: {same}/{n}")
    logit_drift(lms, args.path)
    print(f"load average at the end: {load_average()}")
    print()
    for name in names:
        if name in ("transformers", "llama.cpp"):
            continue
        ours = med[name]
        if name == "scratchlm" and fresh[name]:
            print(f"scratchlm load {fresh[name]['load_s']:.2f} s (target < 3 s)")
        if name == "scratchlm-gguf":
            if "scratchlm-gguf-eager" in names:
                eager = med["scratchlm-gguf-eager"]
                print(f"scratchlm-gguf vs scratchlm-gguf-eager (a token in one call vs its operations one by "
                      f"one): decode {ours['decode'] / eager['decode']:.2f}x "
                      f"({ours['cpu'] / eager['cpu']:.2f}x per CPU s)")
            if "scratchlm-fp16" in names:
                fp16 = med["scratchlm-fp16"]
                print(f"scratchlm-gguf vs scratchlm-fp16: decode {ours['decode'] / fp16['decode']:.2f}x "
                      f"(target >= 1.7x where llama.cpp is absent; "
                      f"{ours['cpu'] / fp16['cpu']:.2f}x per CPU s), "
                      f"prefill {ours['prefill'] / fp16['prefill']:.2f}x (target >= 1x)")
            if fresh[name]:
                print(f"scratchlm-gguf resident after load: {fresh[name]['rss_mib']:.0f} MiB above the "
                      f"interpreter with torch imported, {fresh[name]['rss_mib'] / file_mib:.2f}x the file's "
                      f"{file_mib:.0f} MiB (target <= 1.5x)")
        if "transformers" in names:
            theirs = med["transformers"]
            faster = (f"load {fresh['transformers']['load_s'] / fresh[name]['load_s']:.1f}x faster, "
                      if fresh[name] else "")
            print(f"{name} vs transformers: {faster}"
                  f"decode {ours['decode'] / theirs['decode']:.2f}x "
                  f"({ours['cpu'] / theirs['cpu']:.2f}x per CPU s), "
                  f"prefill {ours['prefill'] / theirs['prefill']:.2f}x")
        if "llama.cpp" in names:
            theirs = med["llama.cpp"]
            print(f"{name} vs llama.cpp (measured here, same threads): decode "
                  f"{ours['decode'] / theirs['decode']:.2f}x ({ours['cpu'] / theirs['cpu']:.2f}x per CPU s; "
                  f"target >= 1.0x for scratchlm-gguf), prefill {ours['prefill'] / theirs['prefill']:.2f}x")
        else:
            print(f"{name} vs llama.cpp: absent, not measured")
    return 0


def core_ghz() -> float | None:
    """This core's clock, from a chain of dependent adds (one a cycle) compiled by the C compiler the
    kernels use, timed in this thread's CPU time; None without a compiler."""
    import ctypes
    import shutil
    import tempfile

    cc = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if cc is None:
        return None
    source = """#include <stdint.h>
#define ADD __asm__ volatile("add $1, %0" : "+r"(x));
uint64_t chain(uint64_t n) {
    uint64_t x = 0;
    for (uint64_t i = 0; i < n; i++) { ADD ADD ADD ADD ADD ADD ADD ADD }
    return x;
}
"""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "chain.c").write_text(source)
        built = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", f"{tmp}/chain.so", f"{tmp}/chain.c"],
                               capture_output=True)
        if built.returncode:  # (x86 assembly)
            return None
        chain = ctypes.CDLL(f"{tmp}/chain.so").chain
        chain.argtypes, chain.restype = [ctypes.c_uint64], ctypes.c_uint64
        n, seconds = 25_000_000, []  # 8 adds each: 0.2 G cycles
        for _ in range(7):
            start = time.thread_time()
            chain(n)
            seconds.append(time.thread_time() - start)
    return 8 * n / statistics.median(seconds) / 1e9


def kernel_figures(path: Path, rounds: int, tokens: int) -> int:
    """The ``--kernels`` figures: the file's matrix products alone, per shape and per token, decoding
    and as a ``tokens``-token prefill."""
    from collections import defaultdict

    import scratchlm
    from scratchlm.quant import kernels
    from scratchlm.quant.linear import QuantLinear

    if not kernels.kernels_available():
        print("error: the packed-weight kernels could not be built (no C compiler?)", file=sys.stderr)
        return 2
    ghz = core_ghz()
    lm = scratchlm.load(path, device="cpu", dtype="gguf")
    layers = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    inputs = [torch.randn(1, layer.in_features) for layer in layers]
    shapes = [f"{layer.type_name} {layer.out_features}x{layer.in_features}" for layer in layers]
    activations = kernels.ACTIVATION_MODES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_average()}; "
          f"{path.name}: {len(layers)} matrix products a token; core clock "
          f"{'unknown' if ghz is None else f'{ghz:.2f} GHz'} (dependent adds); {rounds} passes", flush=True)
    blocks: dict[str, int] = defaultdict(int)
    for layer, shape in zip(layers, shapes, strict=True):
        blocks[shape] += layer.out_features * layer.in_features // 32
    blocks["total"] = sum(blocks.values())
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    for _ in range(rounds + 1):  # the first pass warms up, not counted
        for mode in activations:
            spent: dict[str, float] = defaultdict(float)
            for layer, x, shape in zip(layers, inputs, shapes, strict=True):
                start = time.thread_time()
                kernels.qmatmul(layer.blocks, layer.type_name, layer.out_features, layer.in_features, x, mode)
                spent[shape] += time.thread_time() - start
            spent["total"] = sum(spent.values())
            for shape, value in spent.items():
                seconds[(shape, mode)].append(value)
    header = " ".join(f"{mode + ' µs':>12} {'ns/blk':>7} {'cyc/blk':>7}" for mode in activations)
    print(f"\n{'matrices (count)':>24} {header}")
    for shape in blocks:
        cells = []
        for mode in activations:
            median = statistics.median(seconds[(shape, mode)][1:])
            per_block = median / blocks[shape] * 1e9
            cycles = "-" if ghz is None else f"{per_block * ghz:.2f}"
            cells.append(f"{median * 1e6:12.0f} {per_block:7.2f} {cycles:>7}")
        label = shape if shape == "total" else f"{shape} ({shapes.count(shape)})"
        print(f"{label:>24} " + " ".join(cells))
    total = {mode: statistics.median(seconds[("total", mode)][1:]) for mode in activations}
    print("\nper token: " + ", ".join(f"{mode} {total[mode] * 1e3:.2f} ms" for mode in activations) +
          f"; int15 {total['fp32'] / total['int15']:.2f}x and int8 {total['fp32'] / total['int8']:.2f}x "
          f"as fast as fp32; load average {load_average()}")
    prefill_figures(layers, shapes, rounds, tokens)
    return 0


def prefill_figures(layers: list[Any], shapes: list[str], rounds: int, tokens: int) -> None:
    """The prefill's matrix product per distinct matrix shape, ``tokens`` rows of random x: ours
    (``kernels.qgemm``, int15) against torch's fp32 matmul on the dequantized weights (an fp32
    model's product) and FBGEMM's fp16 one (``dtype="float16"``'s ``PackedLinear``); the median
    of ``rounds`` wall-clock timings after one warm-up call, the sides alternating."""
    from scratchlm.generation.packed import PackedLinear
    from scratchlm.quant import kernels

    print(f"\nprefill matrix products, {tokens} tokens (ms; ours int15 against fp32 MKL and fp16 FBGEMM)")
    print(f"{'matrix':>24} {'ours':>8} {'fp32':>8} {'fp16':>8} {'vs fp32':>8} {'vs fp16':>8}")
    for shape in dict.fromkeys(shapes):
        layer = layers[shapes.index(shape)]
        x, w = torch.randn(tokens, layer.in_features), layer.dequantized()
        fp16 = PackedLinear(weight=w)
        sides = {
            "ours": lambda layer=layer, x=x: kernels.qgemm(
                layer.blocks, layer.type_name, layer.out_features, layer.in_features, x, "int15"),
            "fp32": lambda x=x, w=w: x @ w.T,
            "fp16": lambda x=x, fp16=fp16: fp16(x),
        }
        spent: dict[str, list[float]] = {name: [] for name in sides}
        for run in sides.values():
            run()
        for _ in range(rounds):
            for name, run in sides.items():
                start = time.perf_counter()
                run()
                spent[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(values) * 1e3 for name, values in spent.items()}
        print(f"{shape:>24} {ms['ours']:8.2f} {ms['fp32']:8.2f} {ms['fp16']:8.2f} "
              f"{ms['fp32'] / ms['ours']:7.2f}x {ms['fp16'] / ms['ours']:7.2f}x")


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    sys.exit(main())
