"""Train a tiny transformer on a toy sequence task, watch it learn, resume it, look inside it.

    python train.py                                   reverse, vocab 10, lengths 1..16
    python train.py --task copy --model gpt           another task, the decoder-only model
    python train.py --resume runs/checkpoint.npz      continue exactly where a run stopped
    python train.py --checkpoint runs/checkpoint.npz --evaluate
    python train.py --checkpoint runs/checkpoint.npz --decode "3 1 4 1 5" --svg attention.svg
"""
import argparse
import json
import math
import os
import signal
import sys
import time

from tqdm import tqdm

import tinyattn as ta
from models import ATTENTION_HEADS_USED, MODELS, build_model
from tinyattn import checkpoint, optim
from tinyattn.allocator import tune_allocator
from tinyattn.functional import cross_entropy
from tinyattn.parallel import ShardedBackward, default_shards
from tinyattn.tasks import EOS, FIRST_SYMBOL, PAD, TASKS, SequenceTask, describe
from tinyattn.viz import attention_svg, heatmap_text

DEFAULTS = dict(task="reverse", model="transformer", vocab=10, min_len=1, max_len=16, d_model=64, heads=4, layers=2,
                d_ff=256, dropout=0.0, batch_size=64, lr=3e-3, grad_clip=0.0, warmup=100, steps=1500, eval_every=100, eval_size=512,
                target_accuracy=0.99, seed=0, device=None, threads=None, out="runs", log=None, stop_at=None, by_length=False)
# What a resumed run may change; everything else (model, data, optimizer) comes from the checkpoint.
RUN_SETTINGS = ("steps", "eval_every", "eval_size", "target_accuracy", "device", "threads", "out", "log", "stop_at", "by_length")
CHECKPOINT_NAME = "checkpoint.npz"
ATTENTION_KINDS = {"transformer": "cross-attention", "gpt": "attention on the source", "rnn-attention": "additive attention"}
SAMPLES_SHOWN = 5
INTERRUPTED_EXIT = 130


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end with one line naming the problem and exit code 2, not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = OneLineParser(prog="train.py", description=__doc__.splitlines()[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:]))
    task = parser.add_argument_group("task")
    task.add_argument("--task", choices=sorted(TASKS), help="copy, reverse or sort random sequences (default reverse)")
    task.add_argument("--vocab", type=int, help="number of symbols (default 10)")
    task.add_argument("--min-len", type=int, help="shortest source sequence (default 1)")
    task.add_argument("--max-len", type=int, help="longest source sequence (default 16)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, help="encoder-decoder 'transformer' (default), decoder-only 'gpt', "
                       "or a GRU encoder-decoder without ('rnn') or with ('rnn-attention') additive attention")
    model.add_argument("--d-model", type=int, help="width of the residual stream; the GRU's hidden size for the RNN models (default 64)")
    model.add_argument("--heads", type=int, help="attention heads; must divide --d-model (default 4)")
    model.add_argument("--layers", type=int, help="layers in each stack (default 2)")
    model.add_argument("--d-ff", type=int, help="hidden width of the feed-forward blocks (default 256)")
    model.add_argument("--dropout", type=float, help="dropout probability (default 0.0)")
    training = parser.add_argument_group("training")
    training.add_argument("--batch-size", type=int, help="sequences per step (default 64)")
    training.add_argument("--lr", type=float, help="peak learning rate of Adam (default 3e-3)")
    training.add_argument("--grad-clip", type=float, help="clip the gradients' global norm to this; 0 turns it off (default 0)")
    training.add_argument("--warmup", type=int, help="steps of linear warmup before the cosine decay (default 100)")
    training.add_argument("--steps", type=int, help="total optimizer steps; the cosine decay ends here (default 1500)")
    training.add_argument("--eval-every", type=int, help="evaluate and save a checkpoint every this many steps (default 100)")
    training.add_argument("--eval-size", type=int, help="held-out sequences to evaluate on (default 512)")
    training.add_argument("--target-accuracy", type=float, help="stop early once held-out exact-match reaches this (default 0.99)")
    training.add_argument("--seed", type=int, help="seed of weights, data and dropout (default 0)")
    training.add_argument("--device", choices=["cpu", "cuda"], help="backend: cpu (NumPy) or cuda (CuPy) (default: TINYATTN_DEVICE or cpu)")
    training.add_argument("--threads", type=int, help="threads that share each step, each on its own part of the batch "
                          "(default 2 on a CPU with two or more cores when each part gets enough rows, else 1; 1 with dropout)")
    training.add_argument("--stop-at", type=int, help="stop at this step and save, as if interrupted (to split a run in parts)")
    files = parser.add_argument_group("files")
    files.add_argument("--out", help=f"folder for {CHECKPOINT_NAME} (default runs)")
    files.add_argument("--log", help="append one JSON line per evaluation to this file")
    files.add_argument("--resume", metavar="PATH", help="continue training from this checkpoint")
    inspect = parser.add_argument_group("inspect a trained model (no training)")
    inspect.add_argument("--checkpoint", metavar="PATH", help="the checkpoint to evaluate or decode with")
    inspect.add_argument("--evaluate", action="store_true", help="report held-out accuracy of --checkpoint")
    inspect.add_argument("--decode", metavar="SYMBOLS", help='decode one sequence, e.g. "3 1 4 1 5", and draw its attention')
    inspect.add_argument("--svg", metavar="FILE", help="where --decode writes the attention map (default attention.svg)")
    inspect.add_argument("--by-length", action="store_true", help="also report held-out accuracy for each source length")
    return parser


def check_config(config, parser):
    """Every setting must make sense before anything runs; the first bad one ends the program."""
    def require(condition, message):
        if not condition:
            parser.error(message)

    positive = ("vocab", "min_len", "max_len", "d_model", "heads", "layers", "d_ff", "batch_size", "steps", "eval_every", "eval_size")
    for name in positive:
        require(config[name] > 0, f"--{name.replace('_', '-')} must be positive, got {config[name]}")
    require(config["vocab"] >= 2, f"--vocab must be at least 2, got {config['vocab']}")
    require(config["min_len"] <= config["max_len"], f"--min-len ({config['min_len']}) must not exceed --max-len ({config['max_len']})")
    require(config["model"] not in ATTENTION_HEADS_USED or config["d_model"] % config["heads"] == 0,
            f"--heads ({config['heads']}) must divide --d-model ({config['d_model']})")
    require(0.0 <= config["dropout"] < 1.0, f"--dropout must be in [0, 1), got {config['dropout']}")
    require(config["lr"] > 0 and math.isfinite(config["lr"]), f"--lr must be a positive number, got {config['lr']}")
    require(config["grad_clip"] >= 0, f"--grad-clip must be at least 0, got {config['grad_clip']}")
    require(0 <= config["warmup"] < config["steps"], f"--warmup must be at least 0 and less than --steps ({config['steps']}), got {config['warmup']}")
    require(0.0 < config["target_accuracy"] <= 1.0, f"--target-accuracy must be in (0, 1], got {config['target_accuracy']}")
    require(config["threads"] is None or config["threads"] >= 1, f"--threads must be at least 1, got {config['threads']}")
    require(config["threads"] in (None, 1) or not config["dropout"],
            f"--threads {config['threads']} needs --dropout 0: dropout masks drawn by several threads would make the run unrepeatable")
    require(config["threads"] is None or config["threads"] <= config["batch_size"],
            f"--threads ({config['threads']}) must not exceed --batch-size ({config['batch_size']}): each thread takes a part of the batch")
    require(config["stop_at"] is None or 0 < config["stop_at"] <= config["steps"],
            f"--stop-at must be between 1 and --steps ({config['steps']}), got {config['stop_at']}")


def settings_from(args, saved=None, parser=None):
    """The run's config: defaults, then a checkpoint's config, then the flags given."""
    given = {key: value for key, value in vars(args).items() if value is not None and key in DEFAULTS}
    config = dict(DEFAULTS)
    if saved is not None:
        config.update({key: saved[key] for key in DEFAULTS if key in saved})
        config["stop_at"] = None
        fixed = {key: value for key, value in given.items() if key not in RUN_SETTINGS and value != saved.get(key)}
        if fixed:
            key, value = next(iter(fixed.items()))
            raise checkpoint.CheckpointError(args.resume or args.checkpoint,
                                             f"was trained with --{key.replace('_', '-')} {saved.get(key)}, not {value}; "
                                             "model, data and optimizer settings come from the checkpoint")
    config.update(given)
    check_config(config, parser)
    return config


# --- training -------------------------------------------------------------------------

# Fewer rows than this per thread, and a part's fixed cost per step (Python building and
# walking the graph, dispatching each op), which threads take turns at, outweighs what the
# second core saves. `python benchmarks/threads.py` on the 2-core machine, 2 threads' step
# time over 1 thread's: transformer 0.91 at batch 64, 0.98 at 48, 1.07 at 32; gpt 0.76 at
# 64, 1.04 at 32; the GRU models, a long chain of small per-token ops, 1.74 at 64, 0.93 at 256.
MIN_ROWS_PER_THREAD = {"transformer": 32, "gpt": 32, "rnn": 128, "rnn-attention": 128}


def shards_for(config):
    """The --threads setting, or its default: as many threads as the device allows
    (tinyattn.parallel.default_shards) while each gets enough rows, 1 with dropout."""
    if config["threads"] is not None:
        return config["threads"]
    if config["dropout"]:
        return 1
    most = default_shards(config["device"] or ta.get_default_device())
    return most if config["batch_size"] >= most * MIN_ROWS_PER_THREAD[config["model"]] else 1


def forward_backward(model, params, batch, sharded):
    """The batch's mean token loss, with its gradients added to the .grad of `params` (the
    model's parameters, listed once by the caller: walking the modules costs about half a
    millisecond), the batch's shards running side by side (tinyattn.parallel). Returns the
    loss value and each shard's (logits, labels)."""
    scale = 1.0 / batch.num_tokens  # each shard's summed loss over the whole batch's count: the shards add up to the mean

    def loss_of(shard):
        logits, labels = model.forward_batch(shard)
        return cross_entropy(logits, labels, ignore_index=PAD, reduction="sum") * scale, logits, labels

    outputs = sharded(loss_of, batch.split(sharded.shards), params)
    return sum(loss.item() for loss, _, _ in outputs), [(logits, labels) for _, logits, labels in outputs]


def token_accuracy(predictions):
    """The share of real (non-PAD) label tokens that the logits' argmax gets right."""
    right = total = 0
    for logits, labels in predictions:
        real = labels.data != PAD
        right += int(((logits.data.argmax(axis=-1) == labels.data) & real).sum())
        total += int(real.sum())
    return right / max(total, 1)


class Run:
    """Everything a training run holds, built from a config, and what goes into its checkpoint."""

    def __init__(self, config):
        self.config = config
        self.task = SequenceTask(config["task"], config["vocab"], config["min_len"], config["max_len"])
        self.model = build_model(config, self.task.vocab_size, device=config["device"])
        self.params = self.model.parameters()
        self.optimizer = optim.Adam(self.params, lr=config["lr"])
        self.schedule = optim.WarmupCosine(self.optimizer, config["warmup"], config["steps"])
        self.stream = self.task.batches(config["batch_size"], config["seed"], device=config["device"])
        self.sharded = ShardedBackward(shards_for(config))
        self.step, self.elapsed_before = 0, 0.0

    def train_step(self):
        """One optimizer step on the next batch: (loss, batch, each shard's (logits, labels)).
        A non-finite loss is returned without an update, so the caller can stop with the model intact."""
        batch = next(self.stream)
        self.optimizer.zero_grad()
        loss_value, predictions = forward_backward(self.model, self.params, batch, self.sharded)
        if math.isfinite(loss_value):
            if self.config["grad_clip"]:
                optim.clip_grad_norm_(self.params, self.config["grad_clip"])
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
        return loss_value, batch, predictions

    def state(self, elapsed):
        return {"config": self.config, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "step": self.step, "data": self.stream.state(),
                "dropout_generator": self.model.generator.bit_generator.state, "elapsed": elapsed}

    def restore(self, state, path):
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.stream.set_state(state["data"])
            self.model.generator.bit_generator.state = state["dropout_generator"]
            self.step, self.elapsed_before = int(state["step"]), float(state["elapsed"])
        except (KeyError, ValueError, TypeError) as error:
            raise checkpoint.CheckpointError(path, f"does not fit the model and optimizer: {error}") from None


def evaluate(model, task, batches):
    """Greedy-decode held-out batches: exact-match (EOS included), token accuracy, the same
    for each source length, and some samples."""
    model.eval()
    by_length = {}  # source length -> [sequences, exactly right, right tokens, tokens]
    samples = []
    for batch in batches:
        predictions, _ = model.greedy_decode(batch.source, task.max_len + 1)
        for source, target, predicted in zip(batch.sources, batch.targets, predictions):
            expected = target + [EOS]
            counts = by_length.setdefault(len(source), [0, 0, 0, 0])
            counts[0] += 1
            counts[1] += predicted == expected
            counts[2] += sum(p == e for p, e in zip(predicted, expected))
            counts[3] += len(expected)
            if len(samples) < SAMPLES_SHOWN:
                samples.append((source, predicted, predicted == expected))
    model.train()
    totals = [sum(column) for column in zip(*by_length.values())]
    return {"exact_match": totals[1] / totals[0], "token_accuracy": totals[2] / totals[3], "sequences": totals[0],
            "samples": samples,
            "by_length": {length: {"sequences": n, "exact_match": right / n, "token_accuracy": tokens_right / tokens}
                          for length, (n, right, tokens_right, tokens) in sorted(by_length.items())}}


def show_by_length(result):
    print("source length  sequences  exact-match  token accuracy")
    for length, figures in result["by_length"].items():
        print(f"{length:13d}  {figures['sequences']:9d}  {figures['exact_match']:11.1%}  {figures['token_accuracy']:14.1%}")


def parameters_finite(model):
    return all(bool(p.xp.isfinite(p.data).all()) for p in model.parameters())


def stop_on_divergence(progress, what, path, saved_step):
    progress.close()
    last = f"the last good checkpoint is {path} (step {saved_step})" if saved_step else "no checkpoint was saved"
    print(f"error: {what}; stopping ({last})", file=sys.stderr)
    return 1


def show_samples(samples):
    for source, predicted, right in samples:
        output = [token for token in predicted if token != EOS]
        print(f"  {describe(source)} -> {describe(output)}{'' if EOS in predicted else ' (no EOS)'}  {'✓' if right else '✗'}")


def open_log(path, append):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return open(path, "a" if append else "w")


def train(config, resume=None, resume_path=None):
    """Train until --steps, the target accuracy or an interruption; returns the exit code."""
    run = Run(config)
    if resume is not None:
        run.restore(resume, resume_path)
    eval_batches = run.task.eval_set(config["eval_size"], config["seed"], batch_size=512, device=config["device"])
    path = os.path.join(config["out"], CHECKPOINT_NAME)
    print("config: " + json.dumps({key: config[key] for key in DEFAULTS}), flush=True)
    print(f"model: {config['model']}, {run.model.num_parameters():,} parameters; device {ta.get_default_device()}; "
          f"{run.sharded.shards} thread{'s' if run.sharded.shards > 1 else ''} per step", flush=True)
    log = open_log(config["log"], append=resume is not None) if config["log"] else None
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    start = time.perf_counter()
    saved_step, result = None, None
    progress = tqdm(total=config["steps"], initial=run.step, unit="step", dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while run.step < config["steps"]:
            loss_value, batch, predictions = run.train_step()
            if not math.isfinite(loss_value):
                return stop_on_divergence(progress, f"the loss became {loss_value} at step {run.step + 1}", path, saved_step)
            window_tokens += batch.num_tokens
            progress.update(1)
            if run.step % 10 == 0 or run.step == config["steps"]:
                now = time.perf_counter()
                progress.set_postfix(loss=f"{loss_value:.4f}", acc=f"{token_accuracy(predictions):.3f}", lr=f"{run.optimizer.lr:.2e}",
                                     tok_s=f"{window_tokens / (now - window_start):,.0f}")
                window_start, window_tokens = now, 0
            elapsed = run.elapsed_before + time.perf_counter() - start
            due = run.step % config["eval_every"] == 0 or run.step == config["steps"]
            if due:
                result = evaluate(run.model, run.task, eval_batches)
                line = {"step": run.step, "loss": loss_value, "exact_match": result["exact_match"],
                        "token_accuracy": result["token_accuracy"], "lr": run.optimizer.lr, "elapsed": round(elapsed, 3)}
                progress.write(f"step {run.step:5d}  loss {loss_value:.4f}  held-out exact-match {result['exact_match']:.3f}  "
                               f"token accuracy {result['token_accuracy']:.3f}  {elapsed:.1f}s")
                if log:
                    log.write(json.dumps(line) + "\n")
                    log.flush()
            stop = interrupted or run.step == config["stop_at"] or (due and result["exact_match"] >= config["target_accuracy"])
            if due or stop:
                if not parameters_finite(run.model):  # never save a diverged model over the last good one
                    return stop_on_divergence(progress, f"the weights became non-finite at step {run.step}", path, saved_step)
                checkpoint.save(path, run.state(elapsed))
                saved_step = run.step
            if interrupted:
                progress.close()
                print(f"interrupted at step {run.step}; saved {path}. Resume with: python train.py --resume {path}", file=sys.stderr)
                return INTERRUPTED_EXIT
            if stop:
                break
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous_handler)
        if log:
            log.close()
    elapsed = run.elapsed_before + time.perf_counter() - start
    if run.step == config["stop_at"] and run.step < config["steps"]:
        print(f"stopped at step {run.step} as asked; resume with: python train.py --resume {path}")
        return 0
    if result is None or saved_step != run.step:
        result = evaluate(run.model, run.task, eval_batches)
    reached = "reached" if result["exact_match"] >= config["target_accuracy"] else "did not reach"
    print(f"held-out ({result['sequences']} sequences): exact-match {result['exact_match']:.1%}, "
          f"token accuracy {result['token_accuracy']:.1%} ({reached} the target {config['target_accuracy']:.0%})")
    print(f"steps {run.step}, wall time {elapsed:.1f} s, checkpoint {path}")
    print("samples (input -> output):")
    show_samples(result["samples"])
    if config["by_length"]:
        show_by_length(result)
    return 0


# --- inspecting a checkpoint ----------------------------------------------------------

def load_for_inspection(path, args, parser):
    state = checkpoint.load(path)
    config = settings_from(args, state.get("config", {}), parser)
    run = Run(config)
    run.restore(state, path)
    return run


def parse_symbols(text, vocab, parser):
    try:
        symbols = [int(token) for token in text.replace(",", " ").split()]
    except ValueError:
        parser.error(f"--decode takes symbols as integers separated by spaces, e.g. \"3 1 4 1 5\"; got {text!r}")
    if not symbols or any(not 0 <= s < vocab for s in symbols):
        parser.error(f"--decode symbols must be integers in [0, {vocab}) (the checkpoint's --vocab); got {text!r}")
    return [s + FIRST_SYMBOL for s in symbols]


def decode(run, text, svg_path, parser):
    source = parse_symbols(text, run.config["vocab"], parser)
    if len(source) > run.config["max_len"]:
        parser.error(f"--decode got {len(source)} symbols; this model was trained on at most --max-len {run.config['max_len']}")
    batch = run.task.make_batch([source], device=run.config["device"])
    run.model.eval()
    (predicted,), all_maps = run.model.greedy_decode(batch.source, run.config["max_len"] + 1, need_weights=True)
    expected = run.task.target_for(source) + [EOS]
    print(f"{describe(source)} -> {describe([t for t in predicted if t != EOS])}  "
          f"{'✓' if predicted == expected else '✗ expected ' + describe(expected[:-1])} ({run.config['task']})")
    if all_maps is None:
        print("(this model has no attention to draw: its decoder sees only the encoder's last state)")
        return
    (maps,) = all_maps
    rows, columns = [describe([t]) for t in predicted], [describe([t]) for t in source]
    kind = ATTENTION_KINDS[run.config["model"]]
    for layer, heads in enumerate(maps):
        for head, weights in enumerate(heads):
            print(f"\n{kind}, layer {layer + 1}, head {head + 1} (rows: outputs, columns: inputs)")
            print(heatmap_text(weights, rows, columns))
    with open(svg_path, "w") as file:
        file.write(attention_svg(maps, rows, columns, title=kind))
    print(f"\nwrote {svg_path}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.evaluate or args.decode is not None) and not args.checkpoint:
        parser.error("--evaluate and --decode need --checkpoint PATH")
    if args.checkpoint and args.resume:
        parser.error("use --resume to continue training, or --checkpoint to inspect; not both")
    tune_allocator()
    try:
        if args.device:
            ta.set_default_device(args.device)
        if args.checkpoint:
            run = load_for_inspection(args.checkpoint, args, parser)
            if args.decode is not None:
                decode(run, args.decode, args.svg or "attention.svg", parser)
            else:
                result = evaluate(run.model, run.task, run.task.eval_set(run.config["eval_size"], run.config["seed"], 512,
                                                                        run.config["device"]))
                print(f"{args.checkpoint} (step {run.step}): held-out exact-match {result['exact_match']:.1%}, "
                      f"token accuracy {result['token_accuracy']:.1%} on {result['sequences']} sequences")
                show_samples(result["samples"])
                if args.by_length:
                    show_by_length(result)
            return 0
        resume = checkpoint.load(args.resume) if args.resume else None
        config = settings_from(args, resume.get("config", {}) if resume else None, parser)
        return train(config, resume=resume, resume_path=args.resume)
    except ta.DeviceError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except (checkpoint.CheckpointError, OSError) as error:  # unreadable checkpoints, unwritable --out or --log
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
