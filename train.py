"""Train a tiny transformer on a toy sequence task, watch it learn, resume it, look inside it.

    python train.py                                   reverse, vocab 10, lengths 1..16
    python train.py --task copy --model gpt           another task, the decoder-only model
    python train.py --resume runs/checkpoint.npz      continue exactly where a run stopped
    python train.py --checkpoint runs/checkpoint.npz --evaluate
    python train.py --checkpoint runs/checkpoint.npz --decode "3 1 4 1 5" --svg attention.svg
"""
import argparse
import os
import sys

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C
try:  # Ctrl-C while NumPy and tinyattn load (a fifth of a second): one line, as at any other moment
    import tinyattn as ta
    from models import MODELS, POSITIONAL, Config, ConfigError, memory
    from models.config import RUN_SETTINGS, default_warmup, flag_name, setting_name
    from models.evaluation import show_decode, show_evaluation
    from models.lock import LockError
    from models.training import BEST_NAME, CHECKPOINT_NAME, Run, load_state, train
    from tinyattn import checkpoint, kernels
    from tinyattn.cpu import tune_allocator
    from tinyattn.parallel import PARALLEL_KINDS
    from tinyattn.tasks import FIRST_SYMBOL, TASKS, SequenceTask, lookup_vocab
except KeyboardInterrupt:
    print("train.py: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT)

DEFAULTS = Config()


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end with one line naming the problem and exit code 2, not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = OneLineParser(prog="train.py", description=__doc__.splitlines()[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:]))
    task = parser.add_argument_group("task")
    task.add_argument("--task", choices=sorted(TASKS), help="copy, reverse or sort random sequences, or lookup: the value "
                      "stored under a query key in key-value pairs (default reverse)")
    task.add_argument("--vocab", type=int, help="number of symbols (default 10; for lookup, keys and values are its two "
                      "halves, and the default is enough distinct keys for --max-len: 14 at 16)")
    task.add_argument("--min-len", type=int, help="shortest source sequence (default 1)")
    task.add_argument("--max-len", type=int, help="longest source sequence (default 16; a lookup source is 2 x pairs + 1 long)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, help="encoder-decoder 'transformer' (default), decoder-only 'gpt', "
                       "or a GRU encoder-decoder without ('rnn') or with ('rnn-attention') additive attention")
    model.add_argument("--d-model", type=int, help="width of the residual stream; the GRU's hidden size for the RNN models (default 64)")
    model.add_argument("--heads", type=int, help="attention heads; must divide --d-model (default 4)")
    model.add_argument("--layers", type=int, help="layers in each stack (default 2)")
    model.add_argument("--d-ff", type=int, help="hidden width of the feed-forward blocks (default 256)")
    model.add_argument("--dropout", type=float, help="dropout probability (default 0.0)")
    model.add_argument("--positional", choices=POSITIONAL,
                       help="positions of the transformer models: vectors added to the embeddings, 'learned' (default; "
                       "'rope' for the encoder-decoder on --task lookup) or 'sinusoidal'; inside every attention, 'rope' "
                       "(rotary) or 'alibi' (linear biases); or 'none'")
    model.add_argument("--randomized-positions", type=int, metavar="N",
                       help="positions of each sequence a sorted random subset of 0..N-1, in training and evaluation, "
                       "instead of 0..L-1 (Ruoss et al. 2023); N must cover the longest sequence")
    model.add_argument("--bidirectional", action=argparse.BooleanOptionalAction,
                       help="the RNN models' encoder reads the source both ways, as RNNsearch (default); "
                       "--no-bidirectional: forward only, as checkpoints written before it")
    training = parser.add_argument_group("training")
    training.add_argument("--batch-size", type=int, help="sequences per step (default 64)")
    training.add_argument("--lr", type=float, help="peak learning rate of Adam (default 3e-3)")
    training.add_argument("--grad-clip", type=float, help="clip the gradients' global norm to this; 0 turns it off (default 0)")
    training.add_argument("--warmup", type=int, help="steps of linear warmup before the cosine decay "
                          "(default a tenth of --steps, at most 100)")
    training.add_argument("--steps", type=int, help="total optimizer steps; the cosine decay ends here (default 1500)")
    training.add_argument("--eval-every", type=int, help="evaluate and save a checkpoint every this many steps (default 100)")
    training.add_argument("--eval-size", type=int, help="held-out sequences to evaluate on (default 512)")
    training.add_argument("--eval-max-len", type=int, help="longest held-out source, to test lengths never trained on; "
                          "the model gets positions up to it (default --max-len)")
    training.add_argument("--target-accuracy", type=float, help="stop early once held-out exact-match reaches this (default 0.99)")
    training.add_argument("--seed", type=int, help="seed of weights, data and dropout (default 0)")
    training.add_argument("--device", choices=["cpu", "cuda"], help="backend: cpu (NumPy) or cuda (CuPy) (default: TINYATTN_DEVICE or cpu)")
    training.add_argument("--threads", type=int, help="threads that share each step, each on its own part of the batch "
                          "(default 2 on a CPU with two or more cores when each part gets enough rows, else 1)")
    training.add_argument("--parallel", choices=PARALLEL_KINDS,
                          help="how those threads run: 'processes', a forked worker process each, so the Python parts of a "
                          "step overlap too (default on a Linux CPU), or 'threads' of this process (the default elsewhere)")
    training.add_argument("--kernels", choices=kernels.CHOICES,
                          help="fused: hand-derived kernels (fast); composed: the autodiff engine's ops alone, the code to read "
                          "(default fused; a run setting: a checkpoint trained with one loads and decodes with the other)")
    training.add_argument("--stop-at", type=int, help="stop at this step and save, as if interrupted (to split a run in parts)")
    files = parser.add_argument_group("files")
    files.add_argument("--out", help=f"folder for {CHECKPOINT_NAME}, the latest, and {BEST_NAME}, the best held-out exact-match "
                       "once a run goes wrong after it (default runs; with --resume, the folder of the checkpoint resumed)")
    files.add_argument("--log", help="append one JSON line per evaluation to this file")
    files.add_argument("--watch", metavar="FILE.svg", help="at every evaluation, add the attention map of one held-out "
                       "sequence to this filmstrip (rewritten each time; FILE.html beside it has a step slider)")
    files.add_argument("--resume", metavar="PATH", help="continue training from this checkpoint")
    inspect = parser.add_argument_group("inspect a trained model (no training)")
    inspect.add_argument("--checkpoint", metavar="PATH", help="the checkpoint to evaluate or decode with")
    inspect.add_argument("--evaluate", action="store_true", help="report held-out accuracy of --checkpoint")
    inspect.add_argument("--decode", metavar="SYMBOLS", help='decode one sequence, e.g. "3 1 4 1 5", and draw its attention')
    inspect.add_argument("--svg", metavar="FILE", help="where --decode writes the attention map (default attention.svg)")
    inspect.add_argument("--by-length", action="store_true", help="also report held-out accuracy for each source length")
    return parser


def settings_from(args, saved=None, parser=None):
    """The run's Config: defaults, then a checkpoint's config, then the flags given."""
    given = {key: value for key, value in vars(args).items() if value is not None and hasattr(DEFAULTS, key)}
    config = DEFAULTS
    if saved is not None:
        path = args.resume or args.checkpoint
        try:
            config = Config.from_dict(saved, name=setting_name).replace(stop_at=None)
            if args.resume:  # a resumed copy writes beside itself, never to the --out it was copied from
                config = config.replace(out=os.path.dirname(args.resume) or ".")
        except (ConfigError, TypeError) as error:
            raise checkpoint.CheckpointError(path, f"holds a config that cannot run: {error}") from None
        fixed = {key: value for key, value in given.items() if key not in RUN_SETTINGS and value != getattr(config, key)}
        if fixed:
            key, value = next(iter(fixed.items()))
            trained = flag_saying(key, getattr(config, key))
            asked = flag_saying(key, value) if isinstance(value, bool) else value  # "--d-model 64, not 32"
            raise checkpoint.CheckpointError(path, f"was trained with {trained}, not {asked}; "
                                             "model, data and optimizer settings come from the checkpoint")
        check_learned_positions(config, given, path, parser)
        if "steps" in given and given["steps"] <= config.warmup:
            parser.error(f"--steps ({given['steps']}) must be more than the warmup of {path} ({config.warmup} steps, "
                         f"fixed once trained): give --steps above {config.warmup}")
    else:
        if "warmup" not in given:
            given["warmup"] = default_warmup(given.get("steps", DEFAULTS.steps))
        if given.get("task") == "lookup":
            given.setdefault("vocab", max(DEFAULTS.vocab, lookup_vocab(given.get("max_len", DEFAULTS.max_len))))  # enough keys
            if given.get("model", DEFAULTS.model) == "transformer":  # with learned positions it never learns lookup
                given.setdefault("positional", "rope")
    config = config.replace(**given)
    try:
        config.check(flag_name)
    except ConfigError as error:
        parser.error(str(error))
    check_memory(config, saved, given, args, parser)
    return config


def check_learned_positions(saved, given, path, parser):
    """Learned positions are a table with a row for each position the saved config asked for:
    --eval-max-len may not ask for another size of table (one past it has rows never made)."""
    if saved.positional != "learned" or saved.randomized_positions is not None or "eval_max_len" not in given:
        return
    asked = saved.replace(eval_max_len=given["eval_max_len"])
    if asked.position_count != saved.position_count:
        beyond = ", and positions past those do not exist" if asked.position_count > saved.position_count else ""
        parser.error(f"--eval-max-len ({given['eval_max_len']}) must stay {saved.eval_up_to} for {path}: its learned "
                     f"positions were made for sources up to {saved.eval_up_to}{beyond}")


def flag_saying(setting, value):
    """The flag that sets `setting` to `value`: '--d-model 64'; a switch alone: '--bidirectional', '--no-bidirectional'."""
    if isinstance(value, bool):
        return flag_name(setting) if value else "--no-" + flag_name(setting)[2:]
    return f"{flag_name(setting)} {value}"


def check_memory(config, saved, given, args, parser):
    """Refuse a run whose estimated memory (models/memory.py) exceeds what is available, before
    anything is allocated: a flag's fault in flag terms (exit 2), a checkpoint's naming the file."""
    training = not args.checkpoint
    unknown = memory.unknown(config, training, checkpoint=saved is not None)
    if unknown:
        print(f"train.py: note: {unknown}", file=sys.stderr)
    found = memory.shortfall(config, training=training, checkpoint=saved is not None)
    if found is None:
        return
    part, _ = found
    if saved is None or part == "eval set" and "eval_size" in given:
        parser.error("this run " + memory.shortfall(config, flag_name, training, saved is not None, first=given)[1])
    raise checkpoint.CheckpointError(args.resume or args.checkpoint, f"its config {found[1]}")


def parse_symbols(text, config, parser):
    """--decode's symbols as the task's token ids."""
    try:
        symbols = [int(token) for token in text.replace(",", " ").split()]
    except ValueError:
        parser.error(f"--decode takes symbols as integers separated by spaces, e.g. \"3 1 4 1 5\"; got {text!r}")
    if not symbols or any(not 0 <= s < config.vocab for s in symbols):
        parser.error(f"--decode symbols must be integers in [0, {config.vocab}) (the checkpoint's --vocab); got {text!r}")
    if len(symbols) > config.eval_up_to:
        limit = f"--eval-max-len {config.eval_max_len}" if config.eval_max_len is not None else f"--max-len {config.max_len}"
        parser.error(f"--decode got {len(symbols)} symbols; this run takes sources of at most {limit} "
                     "(a larger --eval-max-len gives positions for longer ones, except to learned positions)")
    source = [s + FIRST_SYMBOL for s in symbols]
    problem = SequenceTask(config.task, config.vocab, config.min_len, config.max_len).source_problem(source)
    if problem:  # a lookup source of the wrong shape
        parser.error(f"--decode {text!r}: {problem}")
    return source


def inspect(args, parser):
    """--checkpoint with --evaluate or --decode: load a trained run and look at it; nothing is written but the SVG."""
    state = load_state(args.checkpoint)
    run = Run(settings_from(args, state["config"], parser))
    run.restore(state, args.checkpoint)
    if args.decode is not None:
        show_decode(run, parse_symbols(args.decode, run.config, parser), args.svg or "attention.svg")
    else:
        show_evaluation(run, args.checkpoint)


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
            inspect(args, parser)
            return 0
        resume = load_state(args.resume) if args.resume else None
        config = settings_from(args, resume["config"] if resume else None, parser)
        return train(config, resume=resume, resume_path=args.resume)
    except ConfigError as error:  # a flag that contradicts the checkpoint (--stop-at before its step)
        parser.error(str(error))
    except ta.DeviceError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except (checkpoint.CheckpointError, LockError, OSError) as error:  # unreadable checkpoints, busy or unwritable --out, --log or --watch
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    except MemoryError:  # past models/memory.py's estimate, or on a GPU, whose memory it does not check
        print("train.py: error: out of memory; make the model, --batch-size or --eval-size smaller", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before training's signal handlers are in place, or while inspecting
        done = "; nothing was written" if args.checkpoint else " before the first step; nothing was saved"
        print(f"train.py: interrupted{done}", file=sys.stderr)
        return INTERRUPTED_EXIT

if __name__ == "__main__":
    sys.exit(main())
