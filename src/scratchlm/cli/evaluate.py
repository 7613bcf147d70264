"""Evaluate a model.  'perplexity': sliding-window perplexity of a text, also in nats and bits per
character (comparable across tokenizers).  The model is anything scratchlm.load opens: a run dir
from 'scratchlm pretrain', a Hugging Face model directory or hub id, or a .gguf file.
'rouge', 'mc', 'ranking', 'judge' and 'report': task metrics over JSONL files (see each --help).
"""

from __future__ import annotations

import argparse
import json

from scratchlm.cli.options import add_model_options, load_model
from scratchlm.data.splits import SPLITS, select_split
from scratchlm.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="evaluations", metavar="EVAL")
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--data", required=True, default=argparse.SUPPRESS, metavar="PATH",
                   help="UTF-8 text file or builtin:NAME (e.g. builtin:tinyshakespeare)")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="the whole text, or the train (first 90%%) / val (last 10%%) split of 'pretrain'")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per window; None = the model's context length")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens the window advances; None = half the context (smaller: closer to the "
                        "true perplexity, slower)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run_perplexity)
    configure_task_evals(sub)


def run_perplexity(args: argparse.Namespace) -> int:
    from scratchlm.data.corpora import read_corpus
    from scratchlm.evaluation.perplexity import perplexity

    text = select_split(read_corpus(args.data), args.split)
    lm = load_model(args)
    if lm.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer, so its text cannot be scored",
                          "pass a model directory that includes tokenizer files")
    result = perplexity(lm.model, lm.tokenizer, text, context_length=args.context_length, stride=args.stride,
                        batch_size=args.batch_size)
    if args.json:
        record = {"model": str(args.model), "data": args.data, "split": args.split, **result.to_dict()}
        print(json.dumps(record))
        return 0
    print(f"model          {args.model}\ndata           {args.data} ({args.split}: {result.characters:,} "
          f"characters, {result.tokens:,} tokens scored)\nwindow         {result.context_length} tokens, "
          f"stride {result.stride}\nloss           {result.loss:.4f} nats/token\nperplexity     "
          f"{result.perplexity:.3f}\nnats/char      {result.nats_per_char:.4f}\nbits/char      "
          f"{result.bits_per_char:.4f}")
    return 0


# --------------------------------------------------------------------------------------------
# Task evaluations: rouge, mc, ranking, judge, report (scratchlm.evaluation.*)
# --------------------------------------------------------------------------------------------

def _doc(module: str) -> str:
    """The docstring of ``scratchlm.evaluation.<module>``, read without importing it (torch, numpy):
    building the parser for --help stays fast."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(f"scratchlm.evaluation.{module}")
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""


def configure_task_evals(sub: argparse._SubParsersAction) -> None:
    def add(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    p = add("rouge", "ROUGE-1/2/L/Lsum of predictions against references", _doc("rouge"))
    p.add_argument("--predictions", required=True, default=argparse.SUPPRESS, metavar="FILE",
                   help="JSONL with 'response' and 'reference' (or 'output') per line, e.g. a finetuning "
                   "run's test_responses.jsonl; or a text file, one prediction per line, with --references")
    p.add_argument("--references", default=None, metavar="FILE",
                   help="references, one per line (text) or JSONL with 'reference'/'output'")
    p.add_argument("--stemmer", action="store_true", help="Porter-stem words longer than 3 characters "
                   "(rouge-score's use_stemmer; needs nltk)")
    p.add_argument("--beta", type=float, default=1.0,
                   help="F-measure weight of recall: F = (1+b^2)PR/(R+b^2 P); 1 = rouge-score's F1, "
                   "8 = Burkov's ROUGE-L")
    p.add_argument("--recall", action="store_true",
                   help="Burkov's dataset-level ROUGE: averages pool the counts (total matches over total "
                   "reference and prediction lengths) instead of averaging per-item scores, and the "
                   "table leads with recall")
    p.add_argument("--out", default=None, metavar="FILE", help="write per-item scores here (JSONL)")
    p.add_argument("--json", action="store_true", help="print the averages as one JSON object")
    p.set_defaults(func=run_rouge)

    p = add("ranking", "Elo and Bradley-Terry ratings (with bootstrap intervals) from pairwise comparisons",
            _doc("ranking"))
    p.add_argument("--comparisons", required=True, default=argparse.SUPPRESS, metavar="FILE",
                   help='JSONL, one {"a": NAME, "b": NAME, "winner": "a"|"b"|"tie"} per line (what '
                   "'eval judge --mode pairwise' writes)")
    p.add_argument("--k", type=float, default=32, help="Elo's update size")
    p.add_argument("--initial", type=float, default=1500,
                   help="Elo's starting rating, and the mean of the Bradley-Terry ratings")
    p.add_argument("--anchor", default=None, metavar="MODEL=RATING",
                   help="shift the Bradley-Terry ratings so that MODEL has RATING (Chatbot Arena pins one)")
    p.add_argument("--l2", type=float, default=0.01,
                   help="Bradley-Terry prior strength (keeps a model that never wins or never loses finite); "
                   "0 = plain maximum likelihood")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap rounds for the 95%% intervals; 0 = none")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="where to draw the ratings with their intervals; None = ratings.png beside the "
                   "comparisons file; 'none' = no plot")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {model, elo, bt, bt_low, bt_high, wins, losses, ties}")
    p.set_defaults(func=run_ranking)

    p = add("mc", "multiple-choice accuracy by log-likelihood (lm-evaluation-harness's acc and acc_norm)",
            _doc("mc"))
    add_model_options(p)
    p.add_argument("--data", required=True, default=argparse.SUPPRESS, metavar="FILE",
                   help='JSONL items {"context": ..., "choices": [...], "label": i}; HellaSwag (ctx, '
                   "endings, label), ARC (question, choices, answerKey) and PIQA (goal, sol1, sol2, label) "
                   "exports are recognised")
    p.add_argument("--fields", default=None, metavar="context=F,choices=F,label=F",
                   help="the file's names for the context, choices and label fields")
    p.add_argument("--delimiter", default=" ",
                   help="text between the context and each choice (lm-eval's target_delimiter)")
    p.add_argument("--few-shot", type=int, default=0, metavar="N",
                   help="prefix every context with the first N items of --few-shot-file, answered")
    p.add_argument("--few-shot-file", default=None, metavar="FILE", help="items for --few-shot (same format)")
    p.add_argument("--add-bos", action="store_true",
                   help="start every sequence with the BOS token (lm-eval does for tokenizers that add one)")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward pass")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="per-item JSONL: each choice's log-likelihood, token count, greedy flag; predictions")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=run_mc)

    p = add("judge", "score responses 0-100, or compare two models pairwise, with an LLM judge",
            _doc("judge"))
    p.add_argument("--responses", required=True, default=argparse.SUPPRESS, metavar="FILE",
                   help="JSONL with instruction, input, output and response (a finetuning run's "
                   "test_responses.jsonl)")
    p.add_argument("--mode", choices=("score", "pairwise"), default=None,
                   help="None = pairwise with --against, else score")
    p.add_argument("--against", default=None, metavar="FILE",
                   help="pairwise: the other model's responses to the same instructions, in the same order")
    p.add_argument("--names", default=None, metavar="A,B",
                   help="pairwise: the two models' names; None = their run directories' (or files') names")
    p.add_argument("--judge-url", default=None, metavar="URL",
                   help="an OpenAI-compatible server (scratchlm serve, Ollama, vLLM): http://host:port[/v1]")
    p.add_argument("--judge-model", default=None, metavar="NAME", help="the model name the server knows")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the server's API key (unset: no key sent)")
    p.add_argument("--judge", default=None, metavar="REF",
                   help="or a model loaded in this process (anything scratchlm.load opens)")
    p.add_argument("--device", default=None, help="--judge: cpu, cuda, ...; None = cuda if available")
    p.add_argument("--prompt", default=None, metavar="FILE",
                   help="the judge prompt, with {input} {output} {response} (score) or {input} {output} "
                   "{response_a} {response_b} (pairwise); None = Raschka's score prompt / ours for pairwise")
    p.add_argument("--parallel", type=int, default=4, help="requests in flight to the server")
    p.add_argument("--retries", type=int, default=4,
                   help="tries after the first, waiting --backoff x 1, 2, 4, ...")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubling)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one reply")
    p.add_argument("--max-tokens", type=int, default=16, help="most tokens in one judge reply")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="judgments JSONL, appended as they arrive and resumed from; None = "
                   "judge_scores.jsonl or judge_pairwise.jsonl beside --responses")
    p.add_argument("--comparisons", default=None, metavar="FILE",
                   help="pairwise: the comparisons file for 'eval ranking'; None = comparisons.jsonl "
                   "beside --out")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run_judge)

    p = add("report", "one HTML (or Markdown) page: curves, ROUGE, judge scores, ranking, samples",
            _doc("report"))
    p.add_argument("paths", nargs="+", metavar="RUN_OR_FILE",
                   help="run directories and/or metrics.jsonl, results.json, test_responses.jsonl, "
                   "judge_scores.jsonl, comparisons.jsonl files")
    p.add_argument("--out", default="report.html", metavar="FILE", help="report.html or report.md")
    p.add_argument("--title", default="scratchlm evaluation report", help="the page's title")
    p.add_argument("--samples", type=int, default=5, help="responses shown beside their references")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the ranking's intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.set_defaults(func=run_report)


def run_rouge(args: argparse.Namespace) -> int:
    from scratchlm.evaluation.records import read_predictions, write_jsonl
    from scratchlm.evaluation.rouge import ROUGE_TYPES
    from scratchlm.evaluation.rouge import rouge as score_rouge

    predictions, references = read_predictions(args.predictions, args.references)
    result = score_rouge(predictions, references, stem=args.stemmer, beta=args.beta, micro=args.recall)
    if args.out:
        write_jsonl(args.out, ({"index": i, **{k: s.to_dict() for k, s in item.items()}}
                               for i, item in enumerate(result.items)))
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    columns = ("recall", "precision", "fmeasure") if args.recall else ("precision", "recall", "fmeasure")
    f_name = "F1" if args.beta == 1 else f"F(beta={args.beta:g})"
    names = {"precision": "precision", "recall": "recall", "fmeasure": f_name}
    average = "pooled counts" if args.recall else "mean of items"
    print(f"{len(result.items)} items, {average}")
    print(f"{'':<10}" + "".join(f"{names[c]:>14}" for c in columns))
    for name in ROUGE_TYPES:
        score = result.average[name].to_dict()
        print(f"{name:<10}" + "".join(f"{score[c]:>14.6f}" for c in columns))
    return 0


def run_ranking(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scratchlm.evaluation.ranking import parse_comparisons, plot_ratings, rank
    from scratchlm.evaluation.records import read_jsonl

    anchor = None
    if args.anchor is not None:
        name, _, value = args.anchor.rpartition("=")
        try:
            anchor = (name, float(value))
        except ValueError:
            anchor = None
        if not name or anchor is None:
            raise ConfigError(f"--anchor {args.anchor!r} is not MODEL=RATING", "pass e.g. --anchor gpt2=1000")
    comparisons = parse_comparisons(read_jsonl(args.comparisons, "comparisons file"), args.comparisons)
    ratings = rank(comparisons, k=args.k, initial=args.initial, l2=args.l2, bootstrap=args.bootstrap,
                   seed=args.seed, anchor=anchor)
    plot = Path(args.comparisons).parent / "ratings.png" if args.plot is None else args.plot
    if str(plot).lower() != "none":
        plot_ratings(ratings, plot, title=f"{len(comparisons)} comparisons")
    if args.json:
        print(json.dumps([r.to_dict() for r in ratings]))
        return 0
    width = max(5, *(len(r.model) for r in ratings))
    print(f"{len(comparisons)} comparisons, {len(ratings)} models; Bradley-Terry 95% intervals from "
          f"{args.bootstrap} bootstrap rounds")
    print(f"{'model':<{width}}  {'BT':>7}  {'95% interval':>15}  {'Elo':>7}  {'wins':>5}  {'losses':>6}  "
          f"{'ties':>5}")
    for r in ratings:
        print(f"{r.model:<{width}}  {r.bt:7.1f}  {r.bt_low:7.1f}-{r.bt_high:<7.1f}  {r.elo:7.1f}  "
              f"{r.wins:5d}  {r.losses:6d}  {r.ties:5d}")
    if str(plot).lower() != "none":
        print(f"plot: {plot}")
    return 0


def run_mc(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from scratchlm.evaluation.mc import evaluate_mc, parse_fields, read_items, with_few_shot
    from scratchlm.evaluation.records import read_jsonl, write_jsonl

    fields = parse_fields(args.fields)
    items = read_items(read_jsonl(args.data, "data file"), args.data, fields)
    if args.few_shot < 0:
        raise ConfigError(f"--few-shot must be 0 or more, got {args.few_shot}", "pass e.g. --few-shot 5")
    if args.few_shot:
        if not args.few_shot_file:
            raise ConfigError("--few-shot needs --few-shot-file", "pass the file to take the examples from")
        shots = read_items(read_jsonl(args.few_shot_file, "few-shot file"), args.few_shot_file, fields)
        if len(shots) < args.few_shot:
            raise ConfigError(f"--few-shot {args.few_shot} but {args.few_shot_file} has {len(shots)} items",
                              "ask for fewer shots or give more examples")
        items = with_few_shot(items, shots[:args.few_shot], args.delimiter)
    lm = load_model(args)
    if lm.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer, so its choices cannot be scored",
                          "pass a model directory that includes tokenizer files")
    with tqdm(total=len(items), desc="items", unit="item", disable=None, file=sys.stderr) as bar:
        result = evaluate_mc(lm.model, lm.tokenizer, items, delimiter=args.delimiter,
                             batch_size=args.batch_size, add_bos=args.add_bos, progress=bar.update)
    if args.out:
        write_jsonl(args.out, (r.to_dict() for r in result.items))
    skipped = [r for r in result.items if r.skipped]
    if skipped:
        shown = ", ".join(str(r.index) for r in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        print(f"warning: skipped {len(skipped)} item{'s' if len(skipped) != 1 else ''} that do not fit the "
              f"model's context (index {shown}): {skipped[0].skipped}", file=sys.stderr)
    metrics = result.metrics()
    if args.json:
        print(json.dumps({"model": str(args.model), "data": args.data, **metrics}))
        return 0
    print(f"model      {args.model}\ndata       {args.data} ({metrics['n']} items scored, "
          f"{metrics['skipped']} skipped)\nacc        {metrics['acc']:.4f} ± {metrics['acc_stderr']:.4f}\n"
          f"acc_norm   {metrics['acc_norm']:.4f} ± {metrics['acc_norm_stderr']:.4f}")
    return 0


def _model_name(path: str) -> str:
    """A model's name from its responses file: the run directory's name for test_responses.jsonl."""
    from pathlib import Path

    p = Path(path).resolve()
    return p.parent.name if p.stem == "test_responses" else p.stem


def run_judge(args: argparse.Namespace) -> int:
    import os
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from scratchlm.evaluation import judge as J
    from scratchlm.evaluation.records import read_jsonl, write_jsonl

    mode = args.mode or ("pairwise" if args.against else "score")
    if mode == "pairwise" and not args.against:
        raise ConfigError("--mode pairwise needs --against FILE", "pass the other model's responses")
    if mode == "score" and args.against:
        raise ConfigError("--against is for --mode pairwise", "leave out --against, or pass --mode pairwise")
    if (args.judge is None) == (args.judge_url is None):
        raise ConfigError("name one judge: --judge-url URL --judge-model NAME, or --judge REF",
                          "e.g. --judge-url http://127.0.0.1:8000/v1 --judge-model NAME")
    if args.judge_url and not args.judge_model:
        raise ConfigError("--judge-url needs --judge-model", "pass the model name the server serves")
    if args.prompt:
        prompt_path = Path(args.prompt)
        if not prompt_path.is_file():
            raise ConfigError(f"--prompt {args.prompt} does not exist", "check the path")
        template = J.check_template(prompt_path.read_text(encoding="utf-8"), mode)
    else:
        template = J.SCORE_PROMPT if mode == "score" else J.PAIRWISE_PROMPT
    entries = J.read_entries(read_jsonl(args.responses, "responses file"), args.responses)
    if mode == "score":
        requests = J.score_requests(entries, template)
        parse = J.parse_score
    else:
        other = J.read_entries(read_jsonl(args.against, "responses file"), args.against)
        requests = J.pairwise_requests(entries, other, template)
        parse = J.parse_verdict
    default_out = "judge_scores.jsonl" if mode == "score" else "judge_pairwise.jsonl"
    out = Path(args.out) if args.out else Path(args.responses).parent / default_out
    if args.judge_url:
        judge = J.HTTPJudge(args.judge_url, args.judge_model, os.environ.get(args.api_key_env),
                            timeout=args.timeout, retries=args.retries, backoff=args.backoff,
                            max_tokens=args.max_tokens)
        parallel = args.parallel
    else:
        from scratchlm.api import load

        judge, parallel = J.LocalJudge(load(args.judge, device=args.device), args.max_tokens), 1
    with tqdm(total=len(requests), desc="judging", unit="req", disable=None, file=sys.stderr) as bar:
        judgments = J.judge_all(judge, requests, out, parallel=parallel, parse=parse, progress=bar.update)
    if mode == "score":
        summary = J.summarise_scores(judgments)
        result = {"mode": "score", "out": str(out), **summary.to_dict()}
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"judged {len(judgments)} responses ({out})\n{summary.describe()}")
        _print_unparsed(summary.unparsed, lambda u: repr(u["reply"][:60]))
        return 0
    names = args.names.split(",") if args.names else [_model_name(args.responses), _model_name(args.against)]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        if args.names:
            raise ConfigError(f"--names {args.names!r} is not two different names",
                              "pass e.g. --names base,tuned")
        names = [names[0] + "-a", names[1] + "-b"]
    comparisons, left_out = J.combine_pairwise(judgments, *names)
    comparisons_path = Path(args.comparisons) if args.comparisons else out.parent / "comparisons.jsonl"
    write_jsonl(comparisons_path, comparisons)
    wins = {w: sum(c["winner"] == w for c in comparisons) for w in ("a", "b", "tie")}
    result = {"mode": "pairwise", "out": str(out), "comparisons": str(comparisons_path), "a": names[0],
              "b": names[1], "wins_a": wins["a"], "wins_b": wins["b"], "ties": wins["tie"],
              "unparsed": len(left_out), "unparsed_items": [u["index"] for u in left_out]}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"judged {len(entries)} pairs in both orders ({out})\n{names[0]} wins {wins['a']}, {names[1]} wins "
          f"{wins['b']}, ties {wins['tie']} (disagreeing orders count as ties)\n"
          f"comparisons: {comparisons_path} "
          f"(rank them with 'scratchlm eval ranking --comparisons {comparisons_path}')")
    _print_unparsed(left_out, lambda u: " / ".join(repr(r[:40]) for r in u["replies"]))
    return 0


def _print_unparsed(unparsed: list, show) -> None:
    if not unparsed:
        return
    print(f"unparsed     {len(unparsed)} repl{'y' if len(unparsed) == 1 else 'ies'} left out of the results "
          "(kept in the judgments file):")
    for u in unparsed[:20]:
        print(f"  item {u['index']}: {show(u)}")
    if len(unparsed) > 20:
        print(f"  ... and {len(unparsed) - 20} more")


def run_report(args: argparse.Namespace) -> int:
    from scratchlm.evaluation.report import write_report

    path = write_report(args.paths, args.out, title=args.title, samples=args.samples,
                        bootstrap=args.bootstrap, seed=args.seed)
    print(f"wrote {path}")
    return 0
