"""Toy sequence tasks: copy, reverse and sort random sequences of symbols, and look up a key.

Token ids: PAD=0, BOS=1, EOS=2, SEP=3, and the task's symbols from 4 on, so a task with
`vocab` symbols uses 4 + vocab ids. For every example:
    encoder input   source                 (padded with PAD)
    decoder input   BOS + target           (padded with PAD)
    decoder labels  target + EOS           (padded with PAD, which the loss ignores)

`lookup` is associative recall, the library search of attention's story: the source is
a query key followed by key-value pairs, `q k1 v1 k2 v2 ... kn vn`, and the target is
the one value stored under q. Keys are the first half of the symbols and values the
second; keys are distinct within a source and so are values (so that counting
gives no hint: only matching the query finds the answer), and the number of pairs
varies with the source's length (2n + 1, within min_len..max_len) as lengths do in the
other tasks.

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


def _look_up(source):
    """The value stored under the query, the source's first symbol, in the key-value pairs after it."""
    query, *pairs = source
    return [value for key, value in zip(pairs[::2], pairs[1::2]) if key == query]


TASKS = {"copy": list, "reverse": _reverse, "sort": sorted, "lookup": _look_up}


def lookup_vocab(max_len):
    """The fewest symbols `lookup` needs for sources up to max_len long: as many keys as the
    most pairs that fit, (max_len - 1) // 2, and as many values."""
    return 2 * max(1, (max_len - 1) // 2)


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


def lookup_problem(vocab, min_len, max_len, name=str):
    """Why `lookup` cannot draw sources with these settings, as (setting, what is wrong with it),
    or None; `name` spells a setting (train.py's flag_name gives '--max-len')."""
    if max_len < 3:
        return "max_len", f"must be at least 3 for the lookup task (one key-value pair and the query), got {max_len}"
    if min_len // 2 > (max_len - 1) // 2:
        return "min_len", (f"({min_len}) leaves no lookup source length up to {name('max_len')} ({max_len}): "
                           "they are odd, 2 x pairs + 1")
    if vocab < lookup_vocab(max_len):
        return "vocab", (f"must be at least {lookup_vocab(max_len)} for the lookup task with {name('max_len')} {max_len}: "
                         f"up to {(max_len - 1) // 2} distinct keys and as many values; got {vocab}")
    return None


class SequenceTask:
    """A task (`copy`, `reverse`, `sort` or `lookup`) over `vocab` symbols with source lengths in [min_len, max_len]."""

    def __init__(self, name="reverse", vocab=10, min_len=1, max_len=16):
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
        if vocab < 2:
            raise ValueError(f"vocab must be at least 2 symbols, got {vocab}")
        if min_len < 1:
            raise ValueError(f"min_len must be at least 1, got {min_len}")
        if min_len > max_len:
            raise ValueError(f"min_len ({min_len}) must not exceed max_len ({max_len})")
        problem = lookup_problem(vocab, min_len, max_len) if name == "lookup" else None
        if problem:
            raise ValueError(" ".join(problem))
        self.name, self.vocab, self.min_len, self.max_len = name, vocab, min_len, max_len
        self.transform = TASKS[name]
        self.keys = range(FIRST_SYMBOL, FIRST_SYMBOL + vocab // 2)  # lookup's keys; its values are the symbols after them
        self.pairs = range(max(1, min_len // 2), (max_len - 1) // 2 + 1)  # lookup's pairs per source: 2n + 1 in [min_len, max_len]

    @property
    def vocab_size(self):
        """Symbols plus the four special tokens."""
        return FIRST_SYMBOL + self.vocab

    def target_for(self, source):
        return list(self.transform(list(source)))

    def sample_sources(self, rng, count):
        if self.name == "lookup":
            return [self._lookup_source(rng, int(n)) for n in rng.integers(self.pairs.start, self.pairs.stop, size=count)]
        lengths = rng.integers(self.min_len, self.max_len + 1, size=count)
        return [rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + self.vocab, size=int(n)).tolist() for n in lengths]

    def _lookup_source(self, rng, pairs):
        keys = (rng.permutation(len(self.keys))[:pairs] + self.keys.start).tolist()
        values = (rng.permutation(FIRST_SYMBOL + self.vocab - self.keys.stop)[:pairs] + self.keys.stop).tolist()
        return [keys[int(rng.integers(pairs))]] + [symbol for pair in zip(keys, values) for symbol in pair]

    def source_problem(self, row):
        """Why `row` cannot be a source of this task, or None."""
        if not row:
            return "a source sequence must have at least one symbol"
        bad = [s for s in row if not FIRST_SYMBOL <= s < FIRST_SYMBOL + self.vocab]
        if bad:
            return f"source symbol ids must lie in [{FIRST_SYMBOL}, {FIRST_SYMBOL + self.vocab}), got {bad[0]}"
        if self.name != "lookup":
            return None
        query, *pairs = row
        keys, values = pairs[::2], pairs[1::2]
        first_value = self.keys.stop - FIRST_SYMBOL
        if len(row) < 3 or len(row) % 2 == 0:
            return f"a lookup source is a query key and key-value pairs (an odd length of at least 3), got length {len(row)}"
        if any(key not in self.keys for key in keys + [query]) or any(value in self.keys for value in values):
            return (f"a lookup source is a query key, then keys (symbols 0..{first_value - 1}) alternating with "
                    f"values (symbols {first_value}..{self.vocab - 1})")
        if len(set(keys)) < len(keys):
            return "a lookup source's keys must be distinct"
        if query not in keys:
            return f"a lookup source's query (its first symbol, {query - FIRST_SYMBOL}) must be one of its keys"
        return None

    def make_batch(self, sources, device=None):
        """Pad the given source rows and their targets into a Batch."""
        for row in sources:
            problem = self.source_problem(row)
            if problem:
                raise ValueError(problem)
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
