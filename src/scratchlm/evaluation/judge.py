"""LLM-as-judge: score responses 0–100 against references, or compare two models' responses pairwise.

The judge is any OpenAI-compatible chat endpoint (``scratchlm serve``, Ollama, vLLM, llama.cpp's
server: ``HTTPJudge``) or a model loaded in this process (``LocalJudge``); both answer one prompt
with one reply, greedily (temperature 0, seed 123 as Raschka's Ollama call).

* **score** (Raschka ch. 7): the prompt is his, verbatim by default: given the Alpaca-formatted
  input and the correct output, score the model response from 0 to 100, "Respond with the integer
  number only."  A reply counts when it is such an integer (``"85"``, ``"Score: 85."``,
  ``"85/100"``); anything else — a sentence that holds a number too — is kept as *unparsed* and
  listed, never dropped, never scored 0.
* **pairwise**: two response files answering the same instructions.  Each pair is asked twice,
  once with each model's response first, which cancels the judge's position bias: the two
  verdicts (A, B or tie, mapped back to the models) agree, or the pair is a tie.  The result is a
  comparisons file that ``eval ranking`` reads.

Every judgment (prompt digest, reply, parse) is appended to the output JSONL as it arrives, each
line flushed and fsynced, so an interrupted run resumes where it stopped without asking again;
a judgment is keyed by item index (and order), and its prompt digest must match on resume (the
inputs did not change under it).  Requests to a server run ``parallel`` at a time; a server that
is down, slow or answers 429/5xx is retried with exponential backoff, and when the retries run out
the run stops with one line — everything judged so far is in the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from scratchlm.errors import ConfigError, DataError, UserError
from scratchlm.evaluation.records import REFERENCE_FIELDS, RESPONSE_FIELDS, JsonlAppender, read_existing
from scratchlm.evaluation.stats import mean_stderr

# Raschka, LLMs from scratch, ch. 7 (the Ollama llama3 judge), with his format_input as {input}.
SCORE_PROMPT = ("Given the input `{input}` and correct output `{output}`, score the model response "
                "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")
PAIRWISE_PROMPT = ("You are comparing two responses to the same instruction.\n\n"
                   "Instruction and input:\n{input}\n\nReference answer:\n{output}\n\n"
                   "Response A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
                   "Which response is better: more correct, more helpful, closer to the reference? "
                   "Answer with exactly one of: A, B, tie.")
PLACEHOLDERS = {"score": ("{input}", "{output}", "{response}"),
                "pairwise": ("{input}", "{output}", "{response_a}", "{response_b}")}
JUDGE_SEED = 123  # Raschka's Ollama options: seed 123, temperature 0


class JudgeUnavailable(UserError):
    """The judge server could not be reached or kept failing after the retries."""


class Judge(Protocol):
    def __call__(self, prompt: str) -> str: ...


# ----- judges ---------------------------------------------------------------------------------

def chat_completions_url(url: str) -> str:
    """``http://host:port``, ``.../v1`` or ``.../v1/chat/completions`` → the chat completions URL."""
    url = url.rstrip("/")
    if not re.match(r"https?://", url):
        raise ConfigError(f"--judge-url {url!r} is not an http(s) URL", "pass e.g. http://127.0.0.1:8000/v1")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class HTTPJudge:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint, with retries and backoff.

    Retried: connection errors, timeouts, HTTP 408/429/5xx and replies that are not the expected
    JSON; waits ``backoff · 2^k`` seconds (k = 0, 1, ...) between tries.  Other HTTP errors
    (400, 401, 404: a wrong model name or key) are not going to change: they stop at once.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, max_tokens: int = 16,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = chat_completions_url(url)
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.backoff, self.max_tokens = timeout, retries, backoff, max_tokens
        self.sleep = sleep

    def __call__(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "seed": JUDGE_SEED, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:200].replace("\n", " ")
                last = f"HTTP {e.code} {detail}".strip()
                if e.code not in (408, 429) and e.code < 500:
                    raise JudgeUnavailable(f"the judge at {self.url} refused the request: {last}",
                                           "check --judge-model and the API key") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e)) or type(e).__name__
            except (ValueError, KeyError, IndexError, TypeError) as e:
                last = f"a reply that is not a chat completion ({type(e).__name__}: {e})"
        raise JudgeUnavailable(f"the judge at {self.url} failed {self.retries + 1} times (last: {last})",
                               "check that the server is up and answering; run the same command again to "
                               "resume (judgments so far are kept)")


class LocalJudge:
    """A model in this process (``scratchlm.load``): its chat template, greedy."""

    def __init__(self, lm: Any, max_tokens: int = 16):
        self.lm, self.max_tokens = lm, max_tokens

    def __call__(self, prompt: str) -> str:
        return self.lm.chat(prompt, temperature=0, max_new_tokens=self.max_tokens)


# ----- prompts and parsing --------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One instruction with its reference and a model's response."""

    instruction: str
    input: str
    output: str
    response: str

    @property
    def formatted_input(self) -> str:
        """The Alpaca-formatted instruction and input, as Raschka's ``format_input`` writes it."""
        from scratchlm.prompts import format_instruction

        return format_instruction({"instruction": self.instruction, "input": self.input,
                                   "output": self.output})[0]


def read_entries(records: Sequence[Mapping[str, Any]], where: str) -> list[Entry]:
    entries = []
    for i, r in enumerate(records, 1):
        if not isinstance(r.get("instruction"), str):
            raise DataError(f"{where}:{i} has no 'instruction' text",
                            "judge a finetuning run's test_responses.jsonl (instruction, input, output, "
                            "response)")
        response = next((r[k] for k in RESPONSE_FIELDS if k in r), None)
        output = next((r[k] for k in REFERENCE_FIELDS if k in r), None)
        if not isinstance(response, str) or not isinstance(output, str):
            raise DataError(f"{where}:{i} needs a 'response' and an 'output' (or 'reference') string",
                            "judge a finetuning run's test_responses.jsonl")
        entries.append(Entry(r["instruction"], str(r.get("input") or ""), output, response))
    if not entries:
        raise DataError(f"{where} holds no responses", "pass a non-empty file")
    return entries


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` placeholders (and only them: other braces in the template stay)."""
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


def check_template(template: str, mode: str) -> str:
    missing = [p for p in PLACEHOLDERS[mode] if p not in template]
    if missing:
        raise ConfigError(f"the {mode} prompt has no {', '.join(missing)} placeholder",
                          f"write a prompt with {', '.join(PLACEHOLDERS[mode])}")
    return template


_SCORE = re.compile(r"(?:score\s*[:=]?\s*)?(\d{1,3})(?:\s*(?:/|out of)\s*100)?\s*[.!]?", re.IGNORECASE)


def parse_score(reply: str) -> int | None:
    """The 0–100 integer a reply is: the number alone, give or take ``Score:``, ``/100`` or
    ``out of 100`` and a final full stop (and surrounding whitespace, quotes, ``*``); None for
    anything else — a sentence that happens to hold a number is not a score."""
    m = _SCORE.fullmatch(reply.strip().strip("*`'\"").strip())
    if m is None:
        return None
    value = int(m.group(1))
    return value if value <= 100 else None


_VERDICT = re.compile(r"\b(A|B|tie)\b", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"``: the reply names exactly one of them (case-insensitive)."""
    found = {m.lower() for m in _VERDICT.findall(reply)}
    if len(found) != 1:
        return None
    word = found.pop()
    return "tie" if word == "tie" else word.upper()


def digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


# ----- running --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    key: str  # "3" (score) or "3:ab" / "3:ba" (pairwise): unique in the output file
    index: int
    prompt: str
    order: str | None = None


def score_requests(entries: Sequence[Entry], template: str = SCORE_PROMPT) -> list[Request]:
    return [Request(str(i), i, fill(template, {"input": e.formatted_input, "output": e.output,
                                               "response": e.response}))
            for i, e in enumerate(entries)]


def pairwise_requests(a: Sequence[Entry], b: Sequence[Entry],
                      template: str = PAIRWISE_PROMPT) -> list[Request]:
    if len(a) != len(b):
        raise DataError(f"the two response files have {len(a)} and {len(b)} items",
                        "compare two files that answer the same instructions, in the same order")
    out = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if (x.instruction, x.input) != (y.instruction, y.input):
            raise DataError(f"item {i} answers different instructions in the two files",
                            "compare two files that answer the same instructions, in the same order")
        for order, (first, second) in (("ab", (x, y)), ("ba", (y, x))):
            prompt = fill(template, {"input": x.formatted_input, "output": x.output,
                                     "response_a": first.response, "response_b": second.response})
            out.append(Request(f"{i}:{order}", i, prompt, order))
    return out


def judge_all(judge: Judge, requests: Sequence[Request], out: str | Path, *, parallel: int = 1,
              parse: Callable[[str], Any],
              progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Ask the judge every request not already in ``out``; append each judgment as it arrives.

    Returns every judgment of ``requests`` (old and new), in request order.  A judgment is
    ``{"key", "index", "order", "prompt_sha", "reply", "parsed"}``; ``parsed`` is None when the reply
    did not parse.  A ``JudgeUnavailable`` stops the run after the judgments in flight are written.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}", "pass e.g. --parallel 4")
    done = {}
    for record in read_existing(out):
        done[record.get("key")] = record
    wanted = {r.key: r for r in requests}
    for key, record in done.items():
        if key in wanted and record.get("prompt_sha") != digest(wanted[key].prompt):
            raise DataError(f"{out} holds a judgment for item {key} of a different prompt",
                            "the inputs changed since it was written: pass another --out, or delete it")
    todo = [r for r in requests if r.key not in done]
    if progress and len(todo) < len(requests):
        progress(len(requests) - len(todo))
    failure: BaseException | None = None
    with JsonlAppender(out) as sink, ThreadPoolExecutor(max_workers=parallel) as pool:
        pending: dict[Future[str], Request] = {}
        queue = iter(todo)

        def submit() -> None:
            request = next(queue, None)
            if request is not None:
                pending[pool.submit(judge, request.prompt)] = request

        for _ in range(parallel):
            submit()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                request = pending.pop(future)
                try:
                    reply = future.result()
                except BaseException as e:  # noqa: BLE001 -- stop submitting, keep what finished
                    failure = failure or e
                    continue
                record = {"key": request.key, "index": request.index, "order": request.order,
                          "prompt_sha": digest(request.prompt), "reply": reply, "parsed": parse(reply)}
                sink.write(record)
                done[request.key] = record
                if progress:
                    progress(1)
                if failure is None:
                    submit()
    if failure is not None:
        raise failure
    return [done[r.key] for r in requests]


# ----- summaries ------------------------------------------------------------------------------

@dataclass
class ScoreSummary:
    scores: list[int]
    unparsed: list[dict[str, Any]]  # {"index", "reply"} of each reply that held no score

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """95 % normal interval of the mean (sample standard deviation over √n)."""
        half = 1.96 * mean_stderr(self.scores)
        return (self.mean - half, self.mean + half)

    def describe(self) -> str:
        """One line: the mean with its interval, or that no reply parsed."""
        if not self.scores:
            return f"no reply held a score; unparsed: {len(self.unparsed)}"
        low, high = self.interval
        interval = f"95% interval {low:.2f} to {high:.2f}" if low == low else "no interval from one score"
        return (f"mean score {self.mean:.2f} ({interval}) over {len(self.scores)} parsed replies; "
                f"unparsed: {len(self.unparsed)}")

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"mean": self.mean, "low": low, "high": high, "n": len(self.scores),
                "unparsed": len(self.unparsed), "unparsed_items": [u["index"] for u in self.unparsed]}


def summarise_scores(judgments: Iterable[Mapping[str, Any]]) -> ScoreSummary:
    scores, unparsed = [], []
    for j in judgments:
        if j["parsed"] is None:
            unparsed.append({"index": j["index"], "reply": j["reply"]})
        else:
            scores.append(int(j["parsed"]))
    return ScoreSummary(scores, sorted(unparsed, key=lambda u: u["index"]))


def combine_pairwise(judgments: Sequence[Mapping[str, Any]], name_a: str, name_b: str
                     ) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Comparisons ``{"a", "b", "winner"}`` from both orders of each item, and the items left out.

    In order "ab" the judge's A is model a; in "ba" its A is model b.  Agreeing verdicts give
    the winner; disagreeing ones (position bias) a tie; an unparsed reply in either order leaves
    the item out (listed with its replies).
    """
    by_item: dict[int, dict[str, Mapping[str, Any]]] = {}
    for j in judgments:
        by_item.setdefault(j["index"], {})[j["order"]] = j
    comparisons, left_out = [], []
    for index in sorted(by_item):
        orders = by_item[index]
        verdicts = []
        for order in ("ab", "ba"):
            v = orders[order]["parsed"] if order in orders else None
            if v in ("A", "B") and order == "ba":
                v = "B" if v == "A" else "A"
            verdicts.append(v)
        if None in verdicts:
            replies = [orders[o]["reply"] for o in ("ab", "ba") if o in orders]
            left_out.append({"index": index, "replies": replies})
            continue
        first, second = verdicts
        winner = {"A": "a", "B": "b", "tie": "tie"}[first] if first == second else "tie"
        comparisons.append({"a": name_a, "b": name_b, "winner": winner, "index": index})
    return comparisons, left_out
