"""The bottleneck experiment: a fixed-vector RNN fails as sequences grow; attention does not.

Trains three encoder-decoders with about the same number of parameters and the same
budget of steps on copy and on reversal of sequences of length 1..32:
    rnn             bidirectional GRU encoder, GRU decoder that sees only both directions' final states
    rnn-attention   the same with additive attention over all encoder states (RNNsearch)
    transformer     the default model of train.py
then decodes a held-out set and reports exact-match and token accuracy by source length.
`--tasks lookup` adds associative recall (the value stored under a query key, among 1..15
key-value pairs), reported by pairs; it is not a default: the plain RNN solves it too.
Writes results.json (with the command, the commit and the machine), results.md (tables)
and accuracy_by_length.svg (a line chart).

    python experiments/bottleneck.py            # the full run, about 11 minutes on 2 cores
    python experiments/bottleneck.py --quick    # a tiny end-to-end run, seconds
"""
import argparse
import json
import os
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's models/ and tinyattn/

from benchmarks.common import machine_info, quick_or_full  # noqa: E402
from models import Config, build_model  # noqa: E402
from models.training import Run  # noqa: E402
from tinyattn.cpu import tune_allocator  # noqa: E402
from tinyattn.tasks import SequenceTask, lookup_vocab  # noqa: E402
from tinyattn.viz import line_chart_svg  # noqa: E402

MODELS = ("rnn", "rnn-attention", "transformer")
FULL = dict(steps=1200, max_len=32, eval_size=1024, bucket=4, width_search=range(16, 257, 2), transformer_width=64)
QUICK = dict(steps=40, max_len=6, eval_size=64, bucket=2, width_search=range(8, 65, 2), transformer_width=16)
TASKS = ("copy", "reverse", "sort", "lookup")


def base_config(settings, task, seed, bidirectional):
    # lookup needs a distinct key for each of its pairs, and as many values
    vocab = max(Config.vocab, lookup_vocab(settings["max_len"])) if task == "lookup" else Config.vocab
    config = Config(task=task, vocab=vocab, max_len=settings["max_len"], steps=settings["steps"], seed=seed,
                  warmup=min(100, settings["steps"] // 4), d_model=settings["transformer_width"],
                  d_ff=4 * settings["transformer_width"], eval_size=settings["eval_size"], bidirectional=bidirectional)
    return config


def matched_configs(settings, task, seed, bidirectional=True):
    """One config per model; the RNNs' hidden sizes chosen so their parameter counts come
    closest to the transformer's."""
    transformer = base_config(settings, task, seed, bidirectional).replace(model="transformer")
    vocab_size = SequenceTask(task, transformer.vocab, max_len=transformer.max_len).vocab_size
    target = build_model(transformer, vocab_size).num_parameters()
    configs = {}
    for name in ("rnn", "rnn-attention"):
        candidates = [transformer.replace(model=name, d_model=width) for width in settings["width_search"]]
        configs[name] = min(candidates, key=lambda c: abs(build_model(c, vocab_size).num_parameters() - target))
    configs["transformer"] = transformer
    return configs


def train_and_evaluate(config, label):
    run = Run(config)
    start = time.perf_counter()
    for _ in tqdm(range(config.steps), desc=label, unit="step", leave=False):
        loss, *_ = run.train_step()
    train_seconds = time.perf_counter() - start
    result = run.evaluate(run.eval_set())
    encoder = {"bidirectional": config.bidirectional} if config.model in ("rnn", "rnn-attention") else {}
    return {"model": config.model, "task": config.task, "parameters": run.model.num_parameters(),
            "hidden_or_d_model": config.d_model, **encoder, "steps": run.step, "final_loss": loss,
            "train_seconds": round(train_seconds, 1), "exact_match": result["exact_match"],
            "token_accuracy": result["token_accuracy"], "by_length": result["by_length"]}


def growth(task):
    """What a task's sources grow in, for its tables and chart: a lookup source of n pairs is 2n + 1 long."""
    return "pairs" if task == "lookup" else "source length"


def by_size(run):
    """A run's figures by what its sources grow in: {length or pairs: figures}."""
    if run["task"] == "lookup":
        return {(int(length) - 1) // 2: figures for length, figures in run["by_length"].items()}
    return {int(length): figures for length, figures in run["by_length"].items()}


def bucketed(figures_by_size, bucket, key):
    """(bucket label, midpoint, mean of `key` weighted by sequences) for sizes grouped `bucket` at a time,
    each labelled by the sizes it holds (lookup's 15 pairs in twos end with "15")."""
    groups = {}
    for size, figures in figures_by_size.items():
        groups.setdefault((size - 1) // bucket * bucket + 1, []).append((size, figures))
    rows = []
    for first, members in sorted(groups.items()):
        last = max(size for size, _ in members)
        count = sum(m["sequences"] for _, m in members)
        rows.append((f"{first}-{last}" if last > first else f"{first}", (first + last) / 2,
                     sum(m[key] * m["sequences"] for _, m in members) / count))
    return rows


def bucket_for(task, bucket):
    """Lengths `bucket` at a time; a lookup's pairs half as many at a time (two symbols a pair)."""
    return max(1, bucket // 2) if task == "lookup" else bucket


def markdown(results, bucket):
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):  # in the order run
        runs = [r for r in results if r["task"] == task]
        lines += [f"### {task}: exact-match by {growth(task)}", "",
                  f"| {growth(task)} | " + " | ".join(f"{r['model']} ({r['parameters']:,} params)" for r in runs) + " |",
                  "| --- | " + " | ".join("---" for _ in runs) + " |"]
        columns = [bucketed(by_size(r), bucket_for(task, bucket), "exact_match") for r in runs]
        for row in zip(*columns):
            lines.append(f"| {row[0][0]} | " + " | ".join(f"{value:.1%}" for _, _, value in row) + " |")
        lines.append("| all | " + " | ".join(f"{r['exact_match']:.1%}" for r in runs) + " |")
        lines.append("| token accuracy, all | " + " | ".join(f"{r['token_accuracy']:.1%}" for r in runs) + " |")
        lines.append("| training seconds | " + " | ".join(f"{r['train_seconds']:.0f}" for r in runs) + " |")
        lines.append("")
    return "\n".join(lines)


def chart(results, bucket):
    panels, x_labels, ranges = {}, {}, {}
    for r in results:
        panel = f"{r['task']}: exact-match by {growth(r['task'])}"
        rows = bucketed(by_size(r), bucket_for(r["task"], bucket), "exact_match")
        panels.setdefault(panel, {})[r["model"]] = [(middle, value) for _, middle, value in rows]
        ranges.update({middle: label for label, middle, _ in rows})  # each bucket's tick says its range, "1-4"
        x_labels[panel] = growth(r["task"])
    return line_chart_svg(panels, x_labels, "exact-match", title="Accuracy as sources grow, held-out sequences", x_ticks=ranges)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, lengths 1..6, 40 steps: an end-to-end check")
    parser.add_argument("--steps", type=int, help="training steps per model (default 1200)")
    parser.add_argument("--tasks", default="copy,reverse", help="comma-separated tasks: copy, reverse, sort, "
                        "lookup (default copy,reverse)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data and held-out set (default 0)")
    parser.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True,
                        help="the RNNs' encoder reads both ways (default); --no-bidirectional: forward only, as before")
    parser.add_argument("--out", default=os.path.join("experiments", "results", "bottleneck"), help="output folder")
    args = parser.parse_args(argv)
    settings = quick_or_full(args, QUICK, FULL, parser)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        parser.error(f"--tasks takes {', '.join(TASKS[:-1])} or {TASKS[-1]}, got {args.tasks!r}")
    machine = machine_info(tune_allocator())
    os.makedirs(args.out, exist_ok=True)
    results, start = [], time.perf_counter()
    for task in tasks:
        for name, config in matched_configs(settings, task, args.seed, args.bidirectional).items():
            result = train_and_evaluate(config, f"{task} {name}")
            print(f"{task:8s} {name:14s} {result['parameters']:>9,} params  exact-match {result['exact_match']:6.1%}  "
                  f"token accuracy {result['token_accuracy']:6.1%}  {result['train_seconds']:.0f} s", flush=True)
            results.append(result)
    command = " ".join(["python experiments/bottleneck.py", *(sys.argv[1:] if argv is None else argv)])
    summary = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine,
               "settings": {key: (list(value) if isinstance(value, range) else value) for key, value in settings.items()},
               "tasks": tasks, "seed": args.seed, "bidirectional": args.bidirectional,
               "total_seconds": round(time.perf_counter() - start, 1), "results": results}
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump(summary, file, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as file:
        file.write(markdown(results, settings["bucket"]))
    with open(os.path.join(args.out, "accuracy_by_length.svg"), "w") as file:
        file.write(chart(results, settings["bucket"]))
    print(markdown(results, settings["bucket"]))
    print(f"total {summary['total_seconds']:.0f} s; wrote {args.out}/results.json, results.md, accuracy_by_length.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
