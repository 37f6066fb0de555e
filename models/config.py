"""A training run's settings in one dataclass, checked in one place.

The command line turns its flags into a Config, and a checkpoint stores one, so the
same `check` vets both. Its messages name a setting through a `name` function: the
command line passes `flag_name` (`--lr`), a checkpoint's loader `setting_name` (`'lr'`),
so a user learns whether the bad value was typed or saved.
"""
import dataclasses
import math
import os
import typing

from tinyattn import kernels
from tinyattn.parallel import PARALLEL_KINDS
from tinyattn.tasks import TASKS, lookup_problem

MODELS = ("transformer", "gpt", "rnn", "rnn-attention")
ATTENTION_HEADS_USED = ("transformer", "gpt")  # the RNN models have one GRU layer each way and no heads
DEVICES = ("cpu", "cuda")
# How the transformer models learn positions: added to the embeddings (learned, sinusoidal), inside every
# attention (rope, alibi), or not at all (none). The RNN models read in order and take none.
POSITIONAL = ("learned", "sinusoidal", "rope", "alibi", "none")


class ConfigError(ValueError):
    """A setting whose value cannot run; the message names the setting as the caller asked."""


def flag_name(setting):
    return "--" + setting.replace("_", "-")


def setting_name(setting):
    return repr(setting)


def positions_needed(model, length):
    """Positions a transformer model feeds for a source of `length`: the encoder-decoder's decoder
    reads BOS + target (length + 1), the decoder-only model BOS source SEP target (2 * length + 2)."""
    return length + 1 if model == "transformer" else 2 * length + 2


def default_warmup(steps):
    """--warmup when not given: a tenth of --steps, at most 100 (so --steps 50 warms up for 5)."""
    return min(100, steps // 10)


@dataclasses.dataclass
class Config:
    """What a run trains (task, model, optimizer: fixed once a checkpoint exists) and how it runs."""

    # task
    task: str = "reverse"
    vocab: int = 10
    min_len: int = 1
    max_len: int = 16
    # model
    model: str = "transformer"
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    d_ff: int = 256
    dropout: float = 0.0
    positional: str = "learned"
    randomized_positions: typing.Optional[int] = None  # positions drawn from 0..N-1 (Ruoss et al. 2023)
    bidirectional: bool = True  # the RNN models' encoder; the others have none
    # training
    batch_size: int = 64
    lr: float = 3e-3
    grad_clip: float = 0.0
    warmup: int = 100  # default_warmup(steps) on the command line
    steps: int = 1500
    seed: int = 0
    # how the run runs: a resumed run may change these (RUN_SETTINGS)
    eval_every: int = 100
    eval_size: int = 512
    eval_max_len: typing.Optional[int] = None  # the longest held-out source; None: max_len
    target_accuracy: float = 0.99
    device: typing.Optional[str] = None
    threads: typing.Optional[int] = None
    parallel: typing.Optional[str] = None  # how the threads run: "processes" or "threads"; None: tinyattn.parallel's default
    kernels: str = kernels.DEFAULT
    out: str = "runs"
    log: typing.Optional[str] = None
    watch: typing.Optional[str] = None
    stop_at: typing.Optional[int] = None
    by_length: bool = False

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def eval_up_to(self):
        """The longest source evaluated: eval_max_len, or max_len without it."""
        return self.max_len if self.eval_max_len is None else self.eval_max_len

    @property
    def position_count(self):
        """Positions a transformer model is built with: 0..N-1 for randomized positions, else as many
        as the longest evaluated sequence feeds."""
        return self.randomized_positions or positions_needed(self.model, self.eval_up_to)

    @classmethod
    def from_dict(cls, values, name=setting_name):
        """A checked Config from saved values; settings it does not know are an error, missing ones take defaults."""
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown setting {name(unknown[0])}")
        config = cls(**{**SAVED_BEFORE_ADDED, **values})
        config.check(name)
        return config

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def check(self, name=flag_name):
        """Raise ConfigError for the first setting that cannot run."""
        def require(condition, setting, problem):
            if not condition:
                raise ConfigError(f"{name(setting)} {problem}")

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = SETTINGS[field.name]
            require(value is None and field.default is None or _is_a(value, expected), field.name,
                    f"must be {expected.__name__ if expected is not float else 'a number'}, got {value!r}")
        choices = {"task": sorted(TASKS), "model": MODELS, "positional": POSITIONAL, "kernels": kernels.CHOICES,
                   "device": DEVICES, "parallel": PARALLEL_KINDS}
        for setting, allowed in choices.items():
            value = getattr(self, setting)
            require(value is None or value in allowed, setting, f"must be one of {', '.join(allowed)}, got {value!r}")
        for setting in ("vocab", "min_len", "max_len", "d_model", "heads", "layers", "d_ff", "batch_size", "steps",
                        "eval_every", "eval_size"):
            require(getattr(self, setting) > 0, setting, f"must be positive, got {getattr(self, setting)}")
        require(self.vocab >= 2, "vocab", f"must be at least 2, got {self.vocab}")
        require(self.min_len <= self.max_len, "min_len", f"({self.min_len}) must not exceed {name('max_len')} ({self.max_len})")
        lookup = lookup_problem(self.vocab, self.min_len, self.max_len, name) if self.task == "lookup" else None
        if lookup:
            require(False, *lookup)
        require(self.model not in ATTENTION_HEADS_USED or self.d_model % self.heads == 0, "heads",
                f"({self.heads}) must divide {name('d_model')} ({self.d_model})")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        for setting in ("positional", "randomized_positions"):
            require(self.model in ATTENTION_HEADS_USED or getattr(self, setting) == getattr(Config, setting), setting,
                    f"applies to the transformer models ({', '.join(ATTENTION_HEADS_USED)}), not {self.model}")
        require(self.eval_max_len is None or self.eval_max_len >= self.max_len, "eval_max_len",
                f"({self.eval_max_len}) must be at least {name('max_len')} ({self.max_len}): evaluation covers the training lengths")
        require(self.randomized_positions is None or self.positional != "none", "randomized_positions",
                f"has no positions to draw with {name('positional')} none")
        needed = positions_needed(self.model, self.eval_up_to)
        require(self.randomized_positions is None or self.randomized_positions >= needed, "randomized_positions",
                f"({self.randomized_positions}) must be at least {needed}: the {self.model} model's longest sequence, for a source "
                f"of {name('eval_max_len') if self.eval_max_len is not None else name('max_len')} {self.eval_up_to}, "
                f"takes {needed} positions")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}")
        require(self.grad_clip >= 0 and math.isfinite(self.grad_clip), "grad_clip", f"must be at least 0, got {self.grad_clip}")
        require(0 <= self.warmup < self.steps, "warmup",
                f"must be at least 0 and less than {name('steps')} ({self.steps}), got {self.warmup}")
        require(self.seed >= 0, "seed", f"must be at least 0, got {self.seed}")
        require(0.0 < self.target_accuracy <= 1.0, "target_accuracy", f"must be in (0, 1], got {self.target_accuracy}")
        require(self.threads is None or self.threads >= 1, "threads", f"must be at least 1, got {self.threads}")
        require(self.threads is None or self.threads <= self.batch_size, "threads",
                f"({self.threads}) must not exceed {name('batch_size')} ({self.batch_size}): each thread takes a part of the batch")
        require(self.parallel != "processes" or self.device != "cuda", "parallel",
                f"processes run CPU shards; with {name('device')} cuda the batch's parts run on threads")
        require(self.parallel != "processes" or hasattr(os, "fork"), "parallel",
                "processes are forked, and this platform cannot fork; use threads")
        require(self.watch is None or self.model != "rnn", "watch",
                "draws attention maps, and the rnn model has none: its decoder sees only the encoder's last state")
        require(self.stop_at is None or 0 < self.stop_at <= self.steps, "stop_at",
                f"must be between 1 and {name('steps')} ({self.steps}), got {self.stop_at}")


def _is_a(value, expected):
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _plain_type(annotation):
    """int for Optional[int] and so on: the type a set value must have."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    return arguments[0] if arguments else annotation


SETTINGS = {field.name: _plain_type(field.type) for field in dataclasses.fields(Config)}
# Settings added after checkpoints were first written, and what a saved config without them
# meant: the RNN models' encoder read one way until it became bidirectional.
SAVED_BEFORE_ADDED = {"bidirectional": False}
# What a resumed run may change; everything else (model, data, optimizer) comes from the checkpoint.
# --eval-max-len too, but learned positions are a table made for it (train.py refuses another).
RUN_SETTINGS = ("steps", "eval_every", "eval_size", "eval_max_len", "target_accuracy", "device", "threads", "parallel",
                "kernels", "out", "log", "watch", "stop_at", "by_length")
