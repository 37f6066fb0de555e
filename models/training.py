"""A training run on a toy task: the model, Adam, the schedule, the data, one step, the loop.

`Run(config)` builds everything a run holds and knows what goes into its checkpoint;
`train(config)` is the loop `python train.py` runs: steps with a progress bar,
evaluation and a checkpoint every --eval-every steps, an early stop at the target
accuracy, Ctrl-C (SIGTERM, SIGHUP) saved and resumable, a diverged model never saved over
a good one, one run at a time on a folder (models/lock.py), and a resumed run never
replacing a checkpoint further on than the one it started from.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time

from tqdm import tqdm

import tinyattn as ta
from tinyattn import backend, checkpoint, cpu, kernels, optim
from tinyattn.functional import cross_entropy
from tinyattn.parallel import ShardedBackward, WorkerError, default_parallel, default_shards
from tinyattn.tasks import PAD, SequenceTask

from . import build_model
from .config import Config, ConfigError
from .evaluation import evaluate, show_by_length, show_samples
from .lock import Lock
from .memory import parameter_count, size_text
from .watch import Filmstrip

CHECKPOINT_NAME = "checkpoint.npz"
BEST_NAME = "best.npz"  # the checkpoint of the best held-out exact-match, once a run goes wrong after it
# An exact-match below half the best, once the best is at least this, is a run gone wrong; early on a learning
# run's evaluations swing (0.28, then 0.0, on 64 sequences of the tiny copy task), and those are noise.
BEST_COLLAPSE = 0.5
EXPLODED = 10  # a loss this many times its best so far (and above chance) is flagged, once
LOG_SPACE = 2**20  # bytes free that --log needs to be worth starting: a line per evaluation
PROGRESS_EVERY = 10  # steps between updates of the progress bar's figures
TERMINAL_WIDTH = 80  # what the config lines wrap to, and what the progress bar fits when its bar is 10 wide (no tty)
# tqdm's default without its rate (tokens per second, in the postfix, says more), so the line fits 80 columns
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
INTERRUPTED_EXIT = 130  # 128 + SIGINT's number, as shells report it; SIGTERM ends with 143, SIGHUP with 129
# Signals that finish the step, save and exit as Ctrl-C does (SIGHUP: the terminal closed; SIGTERM: kill, a job queue)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

# Fewer sequences than this per part of a split batch, counted at width 64, and the part's
# share of a step's fixed cost (Python building and walking the graph, dispatching each
# op), plus the cost of splitting, outweighs what the second core saves. A sequence of a
# wider model counts for its width over 64 (one of d_model 256 counts 4): every op does
# that much more work for the same fixed cost. Threads take turns at the GIL for that
# Python work, and worker processes do not (tinyattn.parallel), so processes pay from far
# smaller parts. On the 2-core Intel Xeon (OpenBLAS's SkylakeX kernels, `python
# benchmarks/threads.py` at 94a6ff4: the sides step alternately in one process, pairwise),
# step time over 1 thread's was, in 2 processes: the transformer 0.91 at batch 16, 0.99 at
# 8, 0.68 at 64, 0.57 at 256; gpt 0.91 at 16, 0.63 at 64; rnn-attention 0.96 at 16, 0.78 at
# 64; rnn 1.02 at 16, 0.89 at 64; the compute-bound config (d_model 256, batch 64) 0.61. On
# 2 threads: the transformer 1.08 at batch 64, 0.65 at 256, 0.79 at d_model 128; the
# compute-bound config 0.63; gpt 0.86 at 64, 1.18 at 32; rnn-attention 2.00 at 64 and 1.06
# at 256 (0.93 on the AMD EPYC).
MIN_ROWS_PER_PART = {"processes": {"transformer": 8, "gpt": 8, "rnn": 32, "rnn-attention": 8},
                     "threads": {"transformer": 64, "gpt": 32, "rnn": 128, "rnn-attention": 128}}
ROW_WIDTH = 64  # the width MIN_ROWS_PER_PART counts sequences at


def shards_for(config):
    """The --threads setting, or its default: as many parts as the device allows
    (tinyattn.parallel.default_shards) while each gets enough rows for how they run
    (MIN_ROWS_PER_PART, by parallel_for)."""
    if config.threads is not None:
        return config.threads
    most = default_shards(config.device or ta.get_default_device())
    rows = config.batch_size * config.d_model / ROW_WIDTH
    return most if rows >= most * MIN_ROWS_PER_PART[parallel_for(config)][config.model] else 1


def parallel_for(config):
    """The --parallel setting, or its default: processes on a Linux CPU, else threads (tinyattn.parallel.default_parallel)."""
    device = config.device or ta.get_default_device()
    if config.parallel == "processes" and device != "cpu":  # config.check sees --device, not TINYATTN_DEVICE
        raise ConfigError(f"--parallel processes run CPU shards; on the {device} device the batch's parts run on threads")
    return config.parallel or default_parallel(device)


def blas_threads_for(config, shards):
    """How many threads each of a step's shards runs its matrix products on. With --threads N
    the step runs on N threads, so each of its N shards gets one; by default the shards of a
    split batch share the process's cores, and an unsplit one stays on one thread: a batch
    too small to split makes matrices too small for BLAS's threads to pay, and BLAS threads
    beyond the step's share spin against any other busy process (docs/performance.md)."""
    if config.threads is not None or shards == 1:
        return 1
    return max(1, cpu.core_count() // shards)


def sharded_backward_for(config, generator=None):
    """The ShardedBackward a run with this config takes its steps with (generator: see ShardedBackward)."""
    shards = shards_for(config)
    return ShardedBackward(shards, generator=generator, blas_threads=blas_threads_for(config, shards),
                           parallel=parallel_for(config))


def config_lines(config, width=TERMINAL_WIDTH):
    """The run's settings as `key=value` pairs, wrapped to fit an 80-column terminal."""
    pairs = " ".join(f"{key}={value}" for key, value in config.to_dict().items())
    return textwrap.wrap(pairs, width, initial_indent="config: ", subsequent_indent=" " * len("config: "),
                         break_long_words=False, break_on_hyphens=False)


def threads_per_step(sharded):
    """'2 threads per step' or '2 processes per step', with the shards and their BLAS threads
    where BLAS runs several per shard."""
    threads = sharded.threads
    if sharded.shards > 1 and sharded.parallel == "processes":
        split = f", {sharded.blas_threads_per_shard} BLAS threads each" if sharded.blas_threads_per_shard > 1 else ""
        return f"{sharded.shards} processes per step{split}"
    split = f" ({sharded.shards} shards of {sharded.blas_threads_per_shard} BLAS threads)" if sharded.blas_threads_per_shard > 1 else ""
    return f"{threads} thread{'s' if threads > 1 else ''} per step{split}"


@dataclasses.dataclass(frozen=True)
class ShardLoss:
    """`ShardLoss(model)(shard, scale)`: the shard's summed token loss times `scale`, with its
    logits and labels. Two are equal for the same model (the dataclass compares its field,
    and a model compares by identity), so worker processes forked for one keep serving the
    next step's (tinyattn.parallel)."""

    model: object

    def __call__(self, shard, scale):
        logits, labels = self.model.forward_batch(shard)
        return cross_entropy(logits, labels, ignore_index=PAD, reduction="sum") * scale, logits, labels


def forward_backward(model, params, batch, sharded):
    """The batch's mean token loss, with its gradients added to the .grad of `params` (the
    model's parameters, listed once by the caller: walking the modules costs about half a
    millisecond), the batch's shards running side by side (tinyattn.parallel). Returns the
    loss as a 0-d tensor, not read (on a GPU reading it waits for the device), and each
    shard's (logits, labels)."""
    scale = 1.0 / batch.num_tokens  # each shard's summed loss over the whole batch's count: the shards add up to the mean
    outputs = sharded(ShardLoss(model), batch.split(sharded.shards), params, scale)
    with ta.no_grad():
        loss = sum((loss for loss, _, _ in outputs[1:]), outputs[0][0])
    return loss, [(logits, labels) for _, logits, labels in outputs]


def token_counts(predictions):
    """(right, total) as arrays on the logits' device, not read: the real (non-PAD) label
    tokens that the logits' argmax gets right, and all real label tokens."""
    right = total = 0
    for logits, labels in predictions:
        real = labels.data != PAD
        right = right + ((logits.data.argmax(axis=-1) == labels.data) & real).sum()
        total = total + real.sum()
    return right, total


def token_accuracy(predictions):
    """The share of real (non-PAD) label tokens that the logits' argmax gets right."""
    right, total = backend.read_scalars(*token_counts(predictions))
    return right / max(total, 1)


class Run:
    """Everything a training run holds, built from a Config, and what goes into its checkpoint."""

    def __init__(self, config):
        self.config = config
        self.task = SequenceTask(config.task, config.vocab, config.min_len, config.max_len)
        self.eval_task = SequenceTask(config.task, config.vocab, config.min_len, config.eval_up_to)  # held-out lengths
        self.model = build_model(config, self.task.vocab_size, device=config.device)
        self.params = self.model.parameters()
        self.optimizer = optim.Adam(self.params, lr=config.lr)
        self.schedule = optim.WarmupCosine(self.optimizer, config.warmup, config.steps)
        self.stream = self.task.batches(config.batch_size, config.seed, device=config.device)
        draws = config.dropout or config.randomized_positions  # random draws in the step: each shard gets its own generator
        self.sharded = sharded_backward_for(config, generator=self.model.generator if draws else None)
        self.step, self.elapsed_before = 0, 0.0
        self.best = None  # {"step", "exact_match"}: the best held-out evaluation saved in this run's folder

    def train_step(self, read_accuracy=False):
        """One optimizer step on the next batch: (loss, batch, the batch's token accuracy, or
        None unless read_accuracy). The step reads one thing back from the device, once: the
        loss, with the accuracy's counts when asked. A non-finite loss is returned without an
        update, so the caller can stop with the model intact. When a worker process dies
        (WorkerError), the data and dropout draws step back to before the batch, so the run
        saved then resumes with it."""
        before = self.stream.state(), self.model.generator.bit_generator.state
        batch = next(self.stream)
        self.optimizer.zero_grad()
        try:
            with kernels.use(self.config.kernels):
                loss, predictions = forward_backward(self.model, self.params, batch, self.sharded)
        except WorkerError:
            self.stream.set_state(before[0])
            self.model.generator.bit_generator.state = before[1]
            raise
        if read_accuracy:
            loss_value, right, total = backend.read_scalars(loss.data, *token_counts(predictions))
            accuracy = right / max(total, 1)
        else:
            loss_value, accuracy = loss.item(), None
        if math.isfinite(loss_value):
            if self.config.grad_clip:
                optim.clip_grad_norm_(self.params, self.config.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
        return loss_value, batch, accuracy

    def evaluate(self, batches):
        # Evaluation is one thread of array work, so its matrix products may use all the step's threads.
        with kernels.use(self.config.kernels), cpu.blas_threads(self.sharded.threads):
            return evaluate(self.model, batches)

    def greedy_decode(self, source, max_new_tokens, need_weights=False):
        with kernels.use(self.config.kernels), cpu.blas_threads(self.sharded.threads):
            return self.model.greedy_decode(source, max_new_tokens, need_weights=need_weights)

    def eval_set(self):
        return self.eval_task.eval_set(self.config.eval_size, self.config.seed, batch_size=512, device=self.config.device)

    def state(self, elapsed):
        return {"config": self.config.to_dict(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "step": self.step, "data": self.stream.state(),
                "dropout_generator": self.model.generator.bit_generator.state, "elapsed": elapsed, "best": self.best}

    def restore(self, state, path):
        problem = saved_state_problem(state)
        if problem:
            raise checkpoint.CheckpointError(path, problem)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.stream.set_state(state["data"])
            self.model.generator.bit_generator.state = state["dropout_generator"]
            self.step, self.elapsed_before = int(state["step"]), float(state["elapsed"])
            self.best = state.get("best")
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, OverflowError) as error:  # generators' states too
            raise checkpoint.CheckpointError(path, f"does not fit the model and optimizer: {error}") from None


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _array_problem(value, what):
    """Why a saved weight or optimizer moment cannot be trained from, or None: it must be a
    floating-point array of finite values (loading would cast integers silently, and a
    NaN or inf spreads to every weight at the first step)."""
    if not backend.is_array(value):
        return f"its {what} is {type(value).__name__}, not an array"
    if value.dtype.kind != "f":
        return f"its {what} holds {value.dtype} values, not floating point"
    xp = backend.array_module(value)
    bad = int(value.size - xp.isfinite(value).sum())
    return f"its {what} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}" if bad else None


def saved_state_problem(state):
    """What makes a loaded checkpoint's training state unusable, in words naming the part, or
    None. Shapes and names are left to the loaders (Module/Adam.load_state_dict); this checks
    what they would let through: values, and the step counts against the saved config."""
    steps = state["config"].get("steps", Config.steps)  # checked by Config.from_dict before a Run is built
    step = state.get("step")
    if not _is_count(step) or not 0 <= step <= steps:
        return f"its step is {step!r}; a run's step is a whole number from 0 to its config's 'steps' ({steps})"
    elapsed = state.get("elapsed")
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < math.inf:
        return f"its elapsed time is {elapsed!r}, not a number of seconds"
    for name, value in state["model"].items():
        problem = _array_problem(value, f"weight {name!r}")
        if problem:
            return problem
    optimizer = state.get("optimizer")
    slots = optimizer.get("state") if isinstance(optimizer, dict) else None
    for index, moments in (slots.items() if isinstance(slots, dict) else ()):
        for name, value in (moments.items() if isinstance(moments, dict) else ()):  # Adam's: a step count, then moments
            if name == "step":
                if not _is_count(value) or not 0 <= value <= steps:
                    return f"its optimizer state 'step' of parameter {index} is {value!r}, not a step from 0 to {steps}"
                continue
            problem = _array_problem(value, f"optimizer state {name!r} of parameter {index}")
            if problem:
                return problem
    best = state.get("best")
    if best is not None and not (isinstance(best, dict) and set(best) == {"step", "exact_match"} and _is_count(best["step"])
                                 and 0 <= best["step"] <= step and isinstance(best["exact_match"], (int, float))
                                 and not isinstance(best["exact_match"], bool) and 0 <= best["exact_match"] <= 1):
        return f"its record of the best evaluation is {best!r}, not a step up to {step} and an exact-match in [0, 1]"
    return None


def load_state(path):
    """A training run's checkpoint: checkpoint.load, then a CheckpointError naming the file
    unless it holds the parts every run saves (a skeleton of null or {} is not a run)."""
    state = checkpoint.load(path)
    if not isinstance(state, dict):
        raise checkpoint.CheckpointError(path, f"holds {'null' if state is None else 'a ' + type(state).__name__}, "
                                         "not a training run's state")
    missing = [part for part in ("config", "model") if not isinstance(state.get(part), dict)]
    if missing:
        raise checkpoint.CheckpointError(path, f"is not a training run's checkpoint: it has no {' and no '.join(missing)}")
    return state


def parameters_finite(model):
    """Whether every weight is finite, read back from the device once for all of them."""
    return all(backend.read_scalars(*(p.xp.isfinite(p.data).all() for p in model.parameters())))


def stop_on_divergence(progress, what, path, saved_step):
    progress.close()
    last = f"the last good checkpoint is {path} (step {saved_step})" if saved_step else "no checkpoint was saved"
    print(f"error: {what}; stopping ({last})", file=sys.stderr)
    return 1


def stop_on_lost_worker(progress, error, run, path, elapsed):
    """Save the run as its last finished step left it, as Ctrl-C does, and say which worker died."""
    progress.close()
    if not parameters_finite(run.model):
        print(f"error: {error}, and the weights are not finite; stopping without saving", file=sys.stderr)
        return 1
    try:
        checkpoint.save(path, run.state(elapsed))
    except OSError as failure:
        raise OSError(f"{error}, and {path} cannot be saved: {failure.strerror or failure}") from None
    print(f"error: {error}; saved step {run.step} in {path}. Resume with: python train.py --resume {path}", file=sys.stderr)
    return 1


def open_log(path, append):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return open(path, "a" if append else "w")


def keep_later_work(path, resume_path, start_step):
    """A resumed run may replace `path` only if it is the file it resumed from or holds an
    earlier step: a copy of step 20 resumed over the folder of the run now at step 40 would
    otherwise overwrite 20 steps of work."""
    if not os.path.exists(path) or os.path.samefile(path, resume_path):
        return
    advice = "a resumed run replaces only an earlier checkpoint; give --out another folder"
    try:
        step = load_state(path).get("step")
    except checkpoint.CheckpointError as error:
        raise checkpoint.CheckpointError(path, f"{error.problem}; {advice}") from None
    if not isinstance(step, int) or isinstance(step, bool) or step > start_step:
        raise checkpoint.CheckpointError(path, f"is at step {step}, after step {start_step} of --resume {resume_path}; {advice}")


def claim_outputs(config, path, resume_path, start_step):
    """Lock --out (and --log), remove what saves killed there left behind, and refuse to
    replace a later checkpoint than a resumed run starts from. Returns the locks, to close."""
    held = contextlib.ExitStack()
    try:
        os.makedirs(config.out, exist_ok=True)
        held.enter_context(Lock.on_folder(config.out))
        if config.log and (os.path.isfile(config.log) or not os.path.exists(config.log)):  # not /dev/null and the like
            folder = os.path.dirname(config.log)
            if folder:
                os.makedirs(folder, exist_ok=True)
            held.enter_context(Lock.on_file(config.log))
        for stale in checkpoint.remove_temporaries(config.out):  # no one else saves here while we hold the lock
            print(f"removed {stale}, left by a save that never finished", flush=True)
        if resume_path is not None:
            keep_later_work(path, resume_path, start_step)
    except BaseException:
        held.close()
        raise
    return held


def _existing_part(path):
    """The longest leading part of `path` that exists ("." for a relative path none of which does)."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path or "."


def _make_folder(folder, what):
    existing = _existing_part(folder)
    if not os.path.isdir(existing):
        raise OSError(f"{what}: {existing} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create {what}: {error.strerror or error}") from None


def _free_space(folder):
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_outputs(config):
    """Refuse, before the first step, an --out that is a file, cannot be written in or has no
    room for a checkpoint, and a --log that is a folder, cannot be written or lies on a full
    disk. Messages name the paths as given; a probe file is removed again, so a run refused
    later leaves nothing new but the folders."""
    what = f"--out {config.out}"
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise OSError(f"{what} is a file, not a folder")
    _make_folder(config.out, what)
    try:
        handle, probe = tempfile.mkstemp(prefix=checkpoint.TEMPORARY_PREFIX, suffix=checkpoint.TEMPORARY_SUFFIX, dir=config.out)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OSError(f"cannot write in {what}: {error.strerror or error}") from None
    need = parameter_count(config) * 12 + 2**16  # float32 weights and Adam's two moments, and the JSON
    free = _free_space(config.out)
    if free is not None and free < need:
        raise OSError(f"{what}: its disk has {size_text(free)} free, and a checkpoint of this run takes about {size_text(need)}")
    for flag, path in (("--log", config.log), ("--watch", config.watch)):
        if path:
            _check_output_file(path, f"{flag} {path}")


def _check_output_file(path, what):
    """Refuse an output file that is a folder, cannot be written, or lies on a full disk."""
    if os.path.isdir(path):
        raise OSError(f"{what} is a folder, not a file")
    folder = os.path.dirname(path) or "."
    _make_folder(folder, f"the folder of {what}")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise OSError(f"cannot write {what}: {error.strerror or error}") from None
    if not existed:
        os.unlink(path)
    free = _free_space(folder)
    if (not existed or os.path.isfile(path)) and free is not None and free < LOG_SPACE:  # not /dev/null and the like
        raise OSError(f"{what}: its disk is full ({size_text(free)} free)")


def carried_best(run, config, path, resume_path, saved_config):
    """The best evaluation a resumed run goes on from, or None: the checkpoint's record holds
    for its own folder and held-out set only (best.npz is the best among that folder's saves)."""
    if run.best is None or not os.path.exists(path) or not os.path.samefile(path, resume_path):
        return None
    return run.best if saved_config.get("eval_size") == config.eval_size else None


def keep_as_best(path, best_path):
    """Make the checkpoint at `path`, about to be replaced by a worse one, best.npz: a hard link
    renamed into place (no copy; the old checkpoint's file lives on under the new name), or a
    copy where the file system has no links. A temporary name first, so best.npz is always whole."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f"{checkpoint.TEMPORARY_PREFIX}best{checkpoint.TEMPORARY_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    try:
        os.link(path, temporary)
    except OSError:
        shutil.copyfile(path, temporary)
    os.replace(temporary, best_path)


def train(config, resume=None, resume_path=None):
    """Train until config.steps, the target accuracy or an interruption; returns the exit code."""
    run = Run(config)
    if resume is not None:
        run.restore(resume, resume_path)
        if config.stop_at is not None and config.stop_at <= run.step:
            raise ConfigError(f"--stop-at ({config.stop_at}) must be after the step of --resume {resume_path} ({run.step})")
    check_outputs(config)
    eval_batches = run.eval_set()
    filmstrip = Filmstrip(config.watch, run, eval_batches, resumed=resume is not None) if config.watch else None
    path, best_path = os.path.join(config.out, CHECKPOINT_NAME), os.path.join(config.out, BEST_NAME)
    if resume is not None:
        run.best = carried_best(run, config, path, resume_path, resume["config"])
    latest_is_best = run.best is not None and run.best["step"] == run.step  # then `path` holds the best: keep it
    outputs = claim_outputs(config, path, resume_path if resume is not None else None, run.step)
    log = progress = output_failure = None
    interrupted, previous_handlers = [], {}
    try:
        print("\n".join(config_lines(config)), flush=True)
        print(f"model: {config.model}, {run.model.num_parameters():,} parameters; {ta.get_default_device()}, "
              f"{threads_per_step(run.sharded)}, {config.kernels} kernels", flush=True)
        log = open_log(config.log, append=resume is not None) if config.log else None
        for number in STOP_SIGNALS:
            if signal.getsignal(number) is not signal.SIG_IGN:  # under nohup SIGHUP stays ignored
                previous_handlers[number] = signal.signal(number, lambda signum, frame: interrupted.append(signum))
        start = time.perf_counter()
        saved_step, result = None, None
        best_loss, chance_loss, flagged = math.inf, math.log(run.task.vocab_size), False
        progress = tqdm(total=config.steps, initial=run.step, unit="step", dynamic_ncols=True, bar_format=BAR_FORMAT)
        window_start, window_tokens = time.perf_counter(), 0
        while run.step < config.steps:
            shows_progress = (run.step + 1) % PROGRESS_EVERY == 0 or run.step + 1 == config.steps
            try:
                loss_value, batch, accuracy = run.train_step(read_accuracy=shows_progress)
            except WorkerError as error:
                return stop_on_lost_worker(progress, error, run, path, run.elapsed_before + time.perf_counter() - start)
            if not math.isfinite(loss_value):
                return stop_on_divergence(progress, f"the loss became {loss_value} at step {run.step + 1}", path, saved_step)
            window_tokens += batch.num_tokens
            progress.update(1)
            if loss_value < best_loss:
                best_loss = loss_value
            elif not flagged and loss_value > EXPLODED * best_loss and loss_value > chance_loss:  # worse than guessing, too
                flagged = True
                progress.write(f"warning: the loss is {loss_value:.4g} at step {run.step}, over {EXPLODED}x its best so far "
                               f"({best_loss:.4g}): training is diverging; a lower --lr (now {config.lr:g}) or --grad-clip may help")
            if shows_progress:
                now = time.perf_counter()
                progress.set_postfix_str(f"loss {loss_value:.4f} acc {accuracy:.3f} "
                                         f"{window_tokens / (now - window_start) / 1000:.1f}k tok/s")
                window_start, window_tokens = now, 0
            elapsed = run.elapsed_before + time.perf_counter() - start
            due = run.step % config.eval_every == 0 or run.step == config.steps
            if due:
                result = run.evaluate(eval_batches)
                line = {"step": run.step, "loss": loss_value, "exact_match": result["exact_match"],
                        "token_accuracy": result["token_accuracy"], "lr": run.optimizer.lr, "elapsed": round(elapsed, 3)}
                progress.write(f"step {run.step:5d}  loss {loss_value:.4f}  held-out exact-match {result['exact_match']:.3f}  "
                               f"token accuracy {result['token_accuracy']:.3f}  {elapsed:.1f}s")
                if log:
                    try:
                        log.write(json.dumps(line) + "\n")
                        log.flush()
                    except OSError as error:  # a full disk, say: reported once this step's checkpoint is saved
                        output_failure = output_failure or (f"--log {config.log}", error)
                if filmstrip:
                    try:
                        filmstrip.add(run.step, result["exact_match"])
                    except OSError as error:
                        output_failure = output_failure or (f"--watch {config.watch}", error)
            stop = interrupted or run.step == config.stop_at or (due and result["exact_match"] >= config.target_accuracy)
            if due or stop:
                if not parameters_finite(run.model):  # never save a diverged model over the last good one
                    return stop_on_divergence(progress, f"the weights became non-finite at step {run.step}", path, saved_step)
                improved = due and (run.best is None or result["exact_match"] >= run.best["exact_match"])
                try:
                    if latest_is_best and due and not improved and (flagged or run.best["exact_match"] >= BEST_COLLAPSE
                                                                    and result["exact_match"] < run.best["exact_match"] / 2):
                        keep_as_best(path, best_path)  # a run gone wrong, not noise: keep its best evaluation
                    if improved:
                        run.best = {"step": run.step, "exact_match": result["exact_match"]}
                    checkpoint.save(path, run.state(elapsed))
                    if improved and os.path.exists(best_path):  # an older, worse best
                        os.unlink(best_path)
                except OSError as error:
                    last = f"the last checkpoint saved is step {saved_step}" if saved_step else "no checkpoint was saved"
                    raise OSError(f"cannot save {path}: {error.strerror or error}; {last}") from None
                saved_step, latest_is_best = run.step, improved
                if output_failure is not None:
                    what, error = output_failure
                    raise OSError(f"cannot write {what}: {error.strerror or error}; step {run.step} is saved in {path}") from None
            if interrupted:
                progress.close()
                number = interrupted[0]
                by = "" if number == signal.SIGINT else f" by {signal.Signals(number).name}"
                print(f"interrupted at step {run.step}{by}; saved {path}. Resume with: python train.py --resume {path}",
                      file=sys.stderr)
                return 128 + number
            if stop:
                break
    finally:
        if progress is not None:
            progress.close()
        if log:
            with contextlib.suppress(OSError):  # after a failed write, closing tries the write again
                log.close()
        run.sharded.close()  # before the locks: a worker forked after them holds their files too
        outputs.close()
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
    elapsed = run.elapsed_before + time.perf_counter() - start
    if run.step == config.stop_at and run.step < config.steps:
        print(f"stopped at step {run.step} as asked; resume with: python train.py --resume {path}")
        return 0
    if result is None or saved_step != run.step:
        try:
            result = run.evaluate(eval_batches)
        except KeyboardInterrupt:  # the stop signals' handlers are gone: Ctrl-C lands here
            saved = f"step {saved_step} is saved in {path}" if saved_step is not None else "this run saved nothing"
            print(f"train.py: interrupted during the final evaluation; {saved}", file=sys.stderr)
            return INTERRUPTED_EXIT
    reached = "reached" if result["exact_match"] >= config.target_accuracy else "did not reach"
    print(f"held-out ({result['sequences']} sequences): exact-match {result['exact_match']:.1%}, "
          f"token accuracy {result['token_accuracy']:.1%}")
    print(f"{reached} the target {config.target_accuracy:.0%} (--target-accuracy)")
    print(f"steps {run.step}, wall time {elapsed:.1f} s, checkpoint {path}")
    print("samples (input -> output):")
    show_samples(result["samples"])
    if config.by_length:
        show_by_length(result)
    return 0
