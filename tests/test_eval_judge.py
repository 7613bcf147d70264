"""LLM-as-judge against a fake OpenAI-compatible server on 127.0.0.1 (good, bad, slow and failing
replies), against our own ``scratchlm serve``, and with a local model; resuming; pairwise."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scratchlm.evaluation.judge import (
    SCORE_PROMPT,
    Entry,
    HTTPJudge,
    JudgeUnavailable,
    chat_completions_url,
    combine_pairwise,
    fill,
    parse_score,
    parse_verdict,
    score_requests,
)

RASCHKA_PROMPT = ("Given the input `{input}` and correct output `{output}`, score the model response "
                  "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                  "Respond with the integer number only.")


class FakeJudge:
    """What the fake server answers.  A response text ``say:<reply>`` makes the judge reply
    ``<reply>``; ``slow`` sleeps past the client's timeout on the first try; ``fail_from`` answers
    500 from that request on; ``status`` answers every request with that HTTP status."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_from: int | None = None
        self.status: int | None = None
        self.delay = 0.0
        self.lock = threading.Lock()
        self.seen_slow: set[str] = set()

    def reply(self, body: dict) -> tuple[int, dict | str]:
        with self.lock:
            self.requests.append(body)
            n = len(self.requests)
        if self.status:
            return self.status, {"error": {"message": "nope"}}
        if self.fail_from is not None and n > self.fail_from:
            return 500, {"error": {"message": "overloaded"}}
        prompt = body["messages"][0]["content"]
        said = re.findall(r"say:([^`\n]*)", prompt)
        text = said[0] if said else "50"
        if "slow" in prompt and prompt not in self.seen_slow:
            self.seen_slow.add(prompt)
            time.sleep(1.5)
        if text == "garbage":
            return 200, "this is not json"
        if self.delay:
            time.sleep(self.delay)
        return 200, {"id": "x", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}]}


@pytest.fixture
def fake():
    state = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 -- http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/chat/completions"
            status, payload = state.reply(body)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def write_responses(path: Path, responses: list[str], instructions: list[str] | None = None) -> Path:
    instructions = instructions or [f"Do task {i}." for i in range(len(responses))]
    records = [{"instruction": ins, "input": "x" if i % 2 else "", "output": f"ref {i}", "response": r}
               for i, (ins, r) in enumerate(zip(instructions, responses, strict=True))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def judge_args(fake, *extra):
    return ("eval", "judge", "--judge-url", fake.url, "--judge-model", "fake", "--backoff", "0.01",
            "--timeout", "1", *extra)


def test_prompt_is_raschkas_verbatim() -> None:
    assert SCORE_PROMPT == RASCHKA_PROMPT
    entry = Entry("Rewrite the sentence.", "The cake was baked by me.", "I baked the cake.", "I baked it.")
    prompt = score_requests([entry])[0].prompt
    assert prompt.startswith("Given the input `Below is an instruction that describes a task. Write a "
                             "response that appropriately completes the request.\n\n### Instruction:\n"
                             "Rewrite the sentence.\n\n### Input:\nThe cake was baked by me.` and correct "
                             "output `I baked the cake.`, score the model response `I baked it.` on a scale")
    assert fill("{x} {y} {{z}} {x}", {"x": "1", "y": "{x}"}) == "1 {x} {{z}} 1"  # one pass, other braces kept


@pytest.mark.parametrize("reply, score", [
    ("85", 85), (" 85.\n", 85), ("Score: 85", 85), ("85/100", 85), ("85 out of 100", 85), ("0", 0),
    ("100", 100), ("101", None), ("-5", None), ("85.5", None), ("80 or 90", None), ("great", None),
    ("", None), ("**90**", 90), ("score = 7", 7), ("The answer is 3.", None), ("1000 grams", None),
])
def test_parse_score(reply, score) -> None:
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), ("b", "B"), ("Tie.", "tie"), ("Response A is better: A", "A"), ("A or B", None), ("?", None),
])
def test_parse_verdict(reply, verdict) -> None:
    assert parse_verdict(reply) == verdict


def test_url_forms() -> None:
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/chat/completions"):
        assert chat_completions_url(url) == "http://h:1/v1/chat/completions"


def test_score_good_bad_slow(tmp_path, fake, run_cli) -> None:
    responses = write_responses(tmp_path / "test_responses.jsonl",
                                ["say:90", "say:Score: 70", "say:I cannot score this", "slow say:40",
                                 "say:60"])
    code, out, err = run_cli(*judge_args(fake, "--responses", responses, "--parallel", "3", "--json"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] == 4 and summary["mean"] == pytest.approx((90 + 70 + 40 + 60) / 4)
    assert summary["unparsed"] == 1 and summary["unparsed_items"] == [2]
    assert summary["low"] < summary["mean"] < summary["high"]
    records = [json.loads(line) for line in (tmp_path / "judge_scores.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3, 4]
    assert next(r for r in records if r["index"] == 2)["parsed"] is None  # kept, not scored 0
    assert len(fake.requests) == 6  # the slow one was asked twice (timeout, then retried)
    assert fake.requests[0]["temperature"] == 0
    code, out, _ = run_cli(*judge_args(fake, "--responses", responses))
    assert code == 0 and "mean score 65.00" in out and "item 2: 'I cannot score this'" in out
    assert len(fake.requests) == 6  # all five were in the file: nothing asked again


def test_resume_after_server_errors(tmp_path, fake, run_cli) -> None:
    responses = write_responses(tmp_path / "r.jsonl", [f"say:{10 * i}" for i in range(6)])
    out_file = tmp_path / "judged.jsonl"
    fake.fail_from = 3
    code, out, err = run_cli(*judge_args(fake, "--responses", responses, "--parallel", "1", "--retries", "2",
                                         "--out", out_file))
    assert code == 2 and out == ""
    assert err.startswith("error: the judge at") and "failed 3 times" in err and "HTTP 500" in err
    assert len(err.strip().splitlines()) == 1
    assert len(out_file.read_text().splitlines()) == 3  # nothing lost
    fake.fail_from = None
    asked = len(fake.requests)
    code, out, _ = run_cli(*judge_args(fake, "--responses", responses, "--out", out_file, "--json"))
    assert code == 0 and json.loads(out)["n"] == 6
    assert len(fake.requests) - asked == 3  # only the three missing ones
    # A torn last line (killed mid-write) is dropped and that judgment asked again.
    out_file.write_text(out_file.read_text()[:-10])
    code, out, _ = run_cli(*judge_args(fake, "--responses", responses, "--out", out_file, "--json"))
    assert code == 0 and json.loads(out)["n"] == 6 and len(fake.requests) - asked == 4


def test_changed_inputs_are_refused(tmp_path, fake, run_cli) -> None:
    responses = write_responses(tmp_path / "r.jsonl", ["say:1", "say:2"])
    assert run_cli(*judge_args(fake, "--responses", responses))[0] == 0
    write_responses(responses, ["say:1", "say:3"])
    code, _, err = run_cli(*judge_args(fake, "--responses", responses))
    assert code == 2 and "different prompt" in err


@pytest.mark.parametrize("case", ["down", "status", "garbage", "slow"])
def test_server_failures_are_one_line(tmp_path, fake, run_cli, case) -> None:
    responses = write_responses(tmp_path / "r.jsonl", ["say:garbage" if case == "garbage" else "say:5"])
    url = fake.url
    if case == "down":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    if case == "status":
        fake.status = 404
    if case == "slow":
        fake.delay = 2.0
    code, out, err = run_cli("eval", "judge", "--judge-url", url, "--judge-model", "fake", "--backoff",
                             "0.01", "--timeout", "0.5", "--retries", "1", "--responses", responses)
    assert code == 2 and out == "" and err.startswith("error: the judge at"), err
    assert len(err.strip().splitlines()) == 1
    assert (tmp_path / "judge_scores.jsonl").read_text() == ""
    if case == "status":
        assert len(fake.requests) == 1  # a 404 is not retried


def test_backoff_doubles(fake) -> None:
    waits: list[float] = []
    fake.status = 503
    judge = HTTPJudge(fake.url, "fake", retries=3, backoff=0.5, sleep=waits.append)
    with pytest.raises(JudgeUnavailable):
        judge("hello")
    assert waits == [0.5, 1.0, 2.0] and len(fake.requests) == 4


def test_pairwise_both_orders_and_ranking(tmp_path, fake, run_cli) -> None:
    instructions = [f"Task {i}" for i in range(4)]
    # The fake judge replies with the first "say:" in the prompt, whichever position it is in: a
    # judge that always prefers model a's text says A in order ab and A (= model b) in order ba.
    a = write_responses(tmp_path / "a.jsonl", ["say:A", "say:A", "say:A", "say:what"], instructions)
    b = write_responses(tmp_path / "b.jsonl", ["x", "y", "z", "w"], instructions)
    code, out, err = run_cli(*judge_args(fake, "--responses", a, "--against", b, "--names", "base,tuned",
                                         "--json"))
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["wins_a"], summary["wins_b"], summary["ties"]) == (0, 0, 3)  # orders disagree: ties
    assert summary["unparsed"] == 1 and summary["unparsed_items"] == [3]  # "what" is no verdict: listed
    judgments = [json.loads(line) for line in (tmp_path / "judge_pairwise.jsonl").read_text().splitlines()]
    expected = [(i, o) for i in range(4) for o in ("ab", "ba")]
    assert sorted((j["index"], j["order"]) for j in judgments) == expected


def test_combine_pairwise_cancels_position_bias() -> None:
    def j(index, order, verdict):
        return {"index": index, "order": order, "parsed": verdict, "reply": str(verdict)}

    judgments = [j(0, "ab", "A"), j(0, "ba", "B"),  # a both times
                 j(1, "ab", "A"), j(1, "ba", "A"),  # always the first: position bias -> tie
                 j(2, "ab", "B"), j(2, "ba", "A"),  # b both times
                 j(3, "ab", "tie"), j(3, "ba", "tie"),
                 j(4, "ab", "A"), j(4, "ba", None)]  # unparsed: left out
    comparisons, left_out = combine_pairwise(judgments, "m1", "m2")
    assert [c["winner"] for c in comparisons] == ["a", "tie", "b", "tie"]
    assert [u["index"] for u in left_out] == [4]


def test_pairwise_writes_comparisons_ranking_reads(tmp_path, fake, run_cli) -> None:
    instructions = [f"Task {i}" for i in range(3)]
    first = write_responses(tmp_path / "a.jsonl", ["say:A"] * 3, instructions)
    second = write_responses(tmp_path / "b.jsonl", ["say:B"] * 3, instructions)
    # ab: A's text says A -> a; ba: b's text (first) says B -> judge's B is model a -> a.  a wins all.
    code, out, err = run_cli(*judge_args(fake, "--responses", first, "--against", second, "--json"))
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["wins_a"], summary["wins_b"], summary["ties"]) == (3, 0, 0)
    assert (summary["a"], summary["b"]) == ("a", "b")
    code, out, _ = run_cli("eval", "ranking", "--comparisons", tmp_path / "comparisons.jsonl", "--json",
                           "--plot", "none", "--bootstrap", "20")
    assert code == 0 and json.loads(out)[0]["model"] == "a"


@pytest.mark.parametrize("case", ["no_judge", "two_judges", "no_model", "pairwise_without_against",
                                  "different_instructions", "lengths", "bad_prompt", "missing_fields"])
def test_cli_bad_inputs(tmp_path, fake, run_cli, case) -> None:
    responses = write_responses(tmp_path / "r.jsonl", ["say:1", "say:2"])
    other = write_responses(tmp_path / "o.jsonl", ["a", "b"], ["Other 0", "Other 1"])
    short = write_responses(tmp_path / "s.jsonl", ["a"])
    (tmp_path / "prompt.txt").write_text("Score {response} please")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    judge = ["--judge-url", fake.url, "--judge-model", "m"]
    args = {"no_judge": ["--responses", responses],
            "two_judges": ["--responses", responses, *judge, "--judge", "x"],
            "no_model": ["--responses", responses, "--judge-url", fake.url],
            "pairwise_without_against": ["--responses", responses, "--mode", "pairwise", *judge],
            "different_instructions": ["--responses", responses, "--against", other, *judge],
            "lengths": ["--responses", responses, "--against", short, *judge],
            "bad_prompt": ["--responses", responses, "--prompt", tmp_path / "prompt.txt", *judge],
            "missing_fields": ["--responses", tmp_path / "bad.jsonl", *judge]}[case]
    code, out, err = run_cli("eval", "judge", *args)
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert fake.requests == []


def test_custom_prompt(tmp_path, fake, run_cli) -> None:
    responses = write_responses(tmp_path / "r.jsonl", ["say:77"])
    (tmp_path / "p.txt").write_text("Rate `{response}` for {input} against {output} {not_a_placeholder}")
    code, out, _ = run_cli(*judge_args(fake, "--responses", responses, "--prompt", tmp_path / "p.txt",
                                       "--json"))
    assert code == 0 and json.loads(out)["mean"] == 77
    assert "{not_a_placeholder}" in fake.requests[0]["messages"][0]["content"]


# ----- our own server, and a local judge ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm():
    import torch

    from scratchlm.api import LM
    from scratchlm.models import build_model, from_preset
    from scratchlm.tokenizers.train_bpe import train_bpe

    text = (Path(__file__).resolve().parent.parent / "src/scratchlm/evaluation/judge.py").read_text()
    tokenizer = train_bpe(text, 300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    config = from_preset("tiny-llama", vocab_size=300, context_length=512)
    torch.manual_seed(0)
    return LM(build_model(config).eval(), tokenizer, config)


def test_against_scratchlm_serve(tmp_path, tiny_lm, run_cli) -> None:
    from scratchlm.serving.openai_server import ServerConfig, ServerThread

    responses = write_responses(tmp_path / "r.jsonl", ["one", "two", "three"])
    with ServerThread(tiny_lm, ServerConfig("tiny")) as server:
        code, out, err = run_cli("eval", "judge", "--judge-url", server.url, "--judge-model", "tiny",
                                 "--responses", responses, "--parallel", "3", "--max-tokens", "4", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] + summary["unparsed"] == 3  # a random model's replies: counted either way
    records = [json.loads(line) for line in (tmp_path / "judge_scores.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(isinstance(r["reply"], str) for r in records)


def test_local_judge(tmp_path, tiny_lm, run_cli) -> None:
    run_dir = tmp_path / "judge-model"
    tiny_lm.save(run_dir)
    responses = write_responses(tmp_path / "r.jsonl", ["one", "two"])
    code, out, err = run_cli("eval", "judge", "--judge", run_dir, "--device", "cpu", "--responses", responses,
                             "--max-tokens", "3", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] + summary["unparsed"] == 2
    direct = tiny_lm.chat(score_requests([Entry("Do task 0.", "", "ref 0", "one")])[0].prompt,
                          temperature=0, max_new_tokens=3)
    first = json.loads((tmp_path / "judge_scores.jsonl").read_text().splitlines()[0])
    assert first["reply"] == direct


def test_summary_without_scores() -> None:
    from scratchlm.evaluation.judge import summarise_scores

    summary = summarise_scores([{"index": 1, "parsed": None, "reply": "x"}, {"index": 0, "parsed": None,
                                                                             "reply": "y"}])
    assert summary.describe() == "no reply held a score; unparsed: 2"
    assert [u["index"] for u in summary.unparsed] == [0, 1]
    assert "interval" in summarise_scores([{"index": 0, "parsed": 5, "reply": "5"}]).describe()
