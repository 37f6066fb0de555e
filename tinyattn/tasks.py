"""Toy sequence tasks: copy, reverse and sort random sequences of symbols.

Token ids: PAD=0, BOS=1, EOS=2, SEP=3, and the task's symbols from 4 on, so a task with
`vocab` symbols uses 4 + vocab ids. For every example:
    encoder input   source                 (padded with PAD)
    decoder input   BOS + target           (padded with PAD)
    decoder labels  target + EOS           (padded with PAD, which the loss ignores)

Batches come from a seeded generator. The held-out evaluation set is drawn from a
generator with a different seed, so training never sees it by construction of the
stream (a sequence may still occur in both by chance, as it would in any random split).
"""
from dataclasses import dataclass

from . import backend
from .engine import Tensor

PAD, BOS, EOS, SEP = 0, 1, 2, 3
FIRST_SYMBOL = 4
SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", SEP: "<sep>"}
EVAL_SEED_OFFSET = 1_000_003  # the evaluation stream's seed is the training seed plus this


def _reverse(symbols):
    return symbols[::-1]


TASKS = {"copy": list, "reverse": _reverse, "sort": sorted}


@dataclass
class Batch:
    """One padded batch of examples, as int64 tensors (and their lengths as Python lists)."""

    source: Tensor          # (B, S) symbols, PAD after each row's length
    decoder_input: Tensor   # (B, T + 1) BOS + target
    labels: Tensor          # (B, T + 1) target + EOS
    sources: list           # the unpadded source rows, as lists of ids
    targets: list           # the unpadded target rows

    def __len__(self):
        return len(self.sources)

    @property
    def num_tokens(self):
        """Label tokens in the batch, EOS included: what the loss is averaged over."""
        return sum(len(t) + 1 for t in self.targets)

    def split(self, count):
        """The rows as `count` consecutive batches of near-equal size (fewer when there are
        fewer rows), each keeping this batch's padded length."""
        if count < 1:
            raise ValueError(f"a batch splits into at least 1 part, got {count}")
        bounds = [len(self) * part // count for part in range(count + 1)]
        return [Batch(*(Tensor(t.data[start:stop], device=t.device) for t in (self.source, self.decoder_input, self.labels)),
                      sources=self.sources[start:stop], targets=self.targets[start:stop])
                for start, stop in zip(bounds, bounds[1:]) if stop > start]


class SequenceTask:
    """A task (`copy`, `reverse` or `sort`) over `vocab` symbols with lengths in [min_len, max_len]."""

    def __init__(self, name="reverse", vocab=10, min_len=1, max_len=16):
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
        if vocab < 2:
            raise ValueError(f"vocab must be at least 2 symbols, got {vocab}")
        if min_len < 1:
            raise ValueError(f"min_len must be at least 1, got {min_len}")
        if min_len > max_len:
            raise ValueError(f"min_len ({min_len}) must not exceed max_len ({max_len})")
        self.name, self.vocab, self.min_len, self.max_len = name, vocab, min_len, max_len
        self.transform = TASKS[name]

    @property
    def vocab_size(self):
        """Symbols plus the four special tokens."""
        return FIRST_SYMBOL + self.vocab

    def target_for(self, source):
        return list(self.transform(list(source)))

    def sample_sources(self, rng, count):
        lengths = rng.integers(self.min_len, self.max_len + 1, size=count)
        return [rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + self.vocab, size=int(n)).tolist() for n in lengths]

    def make_batch(self, sources, device=None):
        """Pad the given source rows and their targets into a Batch."""
        for row in sources:
            if not row:
                raise ValueError("a source sequence must have at least one symbol")
            bad = [s for s in row if not FIRST_SYMBOL <= s < FIRST_SYMBOL + self.vocab]
            if bad:
                raise ValueError(f"source symbol ids must lie in [{FIRST_SYMBOL}, {FIRST_SYMBOL + self.vocab}), got {bad[0]}")
        targets = [self.target_for(row) for row in sources]
        return Batch(source=pad(sources, device=device),
                     decoder_input=pad([[BOS] + t for t in targets], device=device),
                     labels=pad([t + [EOS] for t in targets], device=device),
                     sources=sources, targets=targets)

    def batches(self, batch_size, seed, device=None):
        """An endless, resumable stream of training batches drawn from a generator seeded with `seed`."""
        return BatchStream(self, batch_size, seed, device)

    def eval_set(self, size, seed, batch_size=256, device=None):
        """`size` held-out examples, drawn from a stream seeded differently from training."""
        rng = backend.generator(seed + EVAL_SEED_OFFSET)
        sources = self.sample_sources(rng, size)
        return [self.make_batch(sources[i:i + batch_size], device) for i in range(0, size, batch_size)]


class BatchStream:
    """Endless seeded batches whose position can be saved and restored exactly (for --resume)."""

    def __init__(self, task, batch_size, seed, device=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.task, self.batch_size, self.device = task, batch_size, device
        self.rng = backend.generator(seed)

    def __iter__(self):
        return self

    def __next__(self):
        return self.task.make_batch(self.task.sample_sources(self.rng, self.batch_size), self.device)

    def state(self):
        """The generator's state as a JSON-friendly dict."""
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state


def pad(rows, value=PAD, device=None):
    """Rows of different lengths as one (len(rows), longest) int64 tensor."""
    width = max(len(row) for row in rows)
    return Tensor([row + [value] * (width - len(row)) for row in rows], dtype=backend.int64, device=device)


def describe(ids):
    """Token ids as text: symbols shown as their index from 0, specials by name."""
    return " ".join(SPECIAL_NAMES.get(i, str(i - FIRST_SYMBOL)) for i in ids)
