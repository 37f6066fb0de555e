"""How much memory a run's config needs, estimated from its sizes alone, before anything is allocated.

`estimate(config)` counts, in bytes:
- parameters: the model's exact parameter count (`parameter_count`) at 16 bytes each in
  training (the float32 weight, its gradient and Adam's two moments), 12 when a trained
  model is only inspected (weight and moments: `Run` builds Adam either way);
- a checkpoint resumed or inspected: its arrays, held while the run lasts (12 bytes a parameter);
- activations: what one training step keeps for its backward pass, for a whole batch of
  the longest sequences (`--threads` splits the batch, not the total), with the composed
  kernels, which keep the most. Per token and layer it counts a few floats per unit of
  --d-model and --d-ff and one row of attention scores per head; per output token the
  logits; for the GRU models one cell per time step and encoder direction and, with
  attention, one (source length, --d-model) score input per decoder step. The coefficients
  were measured with tracemalloc on one step of each model (composed kernels, batch 64..256,
  lengths 16..48, --d-model 64..256, --d-ff 64..1024, --vocab 10..1000; the GRU models
  both ways and one way), rounded up: the coefficients alone came within 0.8x..1.6x of the
  measured peak, and ACTIVATION_MARGIN covers the rest;
- evaluation: greedy decoding of one 512-row held-out batch, under no_grad: an eighth of
  a training step's activations for each row (every measured peak was below that),
  counted instead of the step's when larger, since the two never coexist;
- the held-out set: each sequence as Python lists and padded id arrays;
- the interpreter with NumPy and tinyattn loaded (about 40 MB resident, measured).

It is an estimate for refusing what cannot fit (a 300 GB embedding, a batch of 10^8
rows), not a promise that what passes will: `fits` compares it with the memory
available now (`available_memory`).
"""
import os

from tinyattn.tasks import FIRST_SYMBOL

FLOAT = 4  # bytes: weights, activations and Adam's moments are float32
INTERPRETER = 64 * 2**20
ACTIVATION_MARGIN = 1.25
EVAL_BATCH = 512  # rows of one held-out batch (Run.eval_set)
EVAL_ROW_SHARE = 1 / 8  # a decoding row's peak, against a training row's
EVAL_SEQUENCE = 2048  # bytes of one held-out sequence besides its tokens: two lists and three array rows
EVAL_TOKEN = 64  # bytes of one token of it
PARTS = {"parameters": "the parameters, their gradients and Adam's state",
         "checkpoint": "the checkpoint's arrays",
         "activations": "one training step's activations",
         "evaluation": "decoding a held-out batch",
         "eval set": "the held-out set",
         "interpreter": "Python and NumPy"}
# The settings that size each part, in the order a user would best change them.
SIZED_BY = {"parameters": ("d_model", "d_ff", "layers", "vocab", "max_len"),
            "checkpoint": ("d_model", "d_ff", "layers", "vocab", "max_len"),
            "activations": ("batch_size", "max_len", "d_model", "d_ff", "layers", "vocab"),
            "evaluation": ("max_len", "eval_max_len", "d_model", "d_ff", "layers", "vocab"),
            "eval set": ("eval_size", "max_len", "eval_max_len")}


def _linear(inputs, outputs):
    return inputs * outputs + outputs


def _attention_block(d_model, d_ff, cross):
    """A pre-LN layer: norms, self-attention (and cross-attention), the feed-forward block."""
    attention = 4 * _linear(d_model, d_model)
    return (2 + cross) * 2 * d_model + (1 + cross) * attention + _linear(d_model, d_ff) + _linear(d_ff, d_model)


def _gru(inputs, hidden):
    return 3 * hidden * inputs + 3 * hidden * hidden + 6 * hidden


def parameter_count(config):
    """The number of weights `models.build_model(config, ...)` makes, by the layers' shapes."""
    vocab, d, d_ff, layers = config.vocab + FIRST_SYMBOL, config.d_model, config.d_ff, config.layers
    positions = config.position_count if config.positional == "learned" else 0  # only learned positions are weights
    if config.model == "transformer":
        return (vocab * d + positions * d + layers * _attention_block(d, d_ff, 0) + 2 * d
                + layers * _attention_block(d, d_ff, 1) + 2 * d + _linear(d, vocab))
    if config.model == "gpt":
        return vocab * d + positions * d + layers * _attention_block(d, d_ff, 0) + 2 * d + _linear(d, vocab)
    directions = 2 if config.bidirectional else 1
    bridge = _linear(2 * d, d) if config.bidirectional else 0
    context = directions * d if config.model == "rnn-attention" else 0
    attention = d + d * d + _linear(context, d) if context else 0
    return (vocab * d + directions * _gru(d, d) + bridge + _gru(d + context, d) + attention
            + _linear(d + context, vocab))


def _step_floats(config, rows):
    """Floats one training step keeps for `rows` sequences of the longest length."""
    vocab, d, d_ff, heads, layers = config.vocab + FIRST_SYMBOL, config.d_model, config.d_ff, config.heads, config.layers
    dropout = 6 * d if config.dropout else 0
    if config.model == "transformer":
        source, target = config.max_len, config.max_len + 1
        encoder = source * (18 * d + 3 * d_ff + dropout + 4 * heads * source)
        decoder = target * (28 * d + 3 * d_ff + dropout + 4 * heads * (target + source))
        return rows * (layers * (encoder + decoder) + 4 * d * (source + target) + 6 * vocab * target)
    if config.model == "gpt":
        tokens = 2 * config.max_len + 1
        return rows * tokens * (layers * (20 * d + 3 * d_ff + dropout + 4 * heads * tokens) + 4 * d + 6 * vocab)
    source, target, directions = config.max_len, config.max_len + 1, 2 if config.bidirectional else 1
    attention = target * (2 * source * d + 8 * d) if config.model == "rnn-attention" else 0
    return rows * ((directions * source + target) * 20 * d + attention + 6 * vocab * target)


def estimate(config, training=True, checkpoint=False):
    """Bytes each part of a run needs, as a dict (PARTS names them); their sum is the estimate.
    training=False: a trained model inspected (no step, no gradients); checkpoint: one was loaded."""
    parameters = parameter_count(config)
    step = _step_floats(config, config.batch_size) * FLOAT * ACTIVATION_MARGIN
    held_out = config.replace(max_len=config.eval_up_to, eval_max_len=None)  # evaluation's sequences, up to --eval-max-len
    decoding = _step_floats(held_out, min(config.eval_size, EVAL_BATCH)) * FLOAT * ACTIVATION_MARGIN * EVAL_ROW_SHARE
    parts = {"parameters": parameters * FLOAT * (4 if training else 3),
             "checkpoint": parameters * FLOAT * 3 if checkpoint else 0,
             "activations": step if training and step >= decoding else 0,
             "evaluation": decoding if not training or decoding > step else 0,
             "eval set": config.eval_size * (EVAL_SEQUENCE + EVAL_TOKEN * config.eval_up_to),
             "interpreter": INTERPRETER}
    return {part: int(size) for part, size in parts.items()}


def available_memory():
    """(bytes, where the figure came from) of memory available to a new allocation now, or
    (None, why not) where the system does not say: MemAvailable of /proc/meminfo on Linux
    (free memory plus what the kernel can reclaim), else os.sysconf's available pages
    (SC_AVPHYS_PAGES), else its physical pages (SC_PHYS_PAGES: all of memory, macOS)."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    for pages, source in (("SC_AVPHYS_PAGES", "available pages"), ("SC_PHYS_PAGES", "physical memory")):
        try:
            count, size = os.sysconf(pages), os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            continue
        if count > 0 and size > 0:
            return count * size, f"the system's {source}"
    return None, "neither /proc/meminfo nor os.sysconf reports the memory available"


def size_text(size):
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size / 2**10:,.1f} KB"


def shortfall(config, name=None, training=True, checkpoint=False, first=()):
    """None when the estimate fits the memory available (or that is unknown: see `unknown`),
    else (the largest part, one sentence): the estimate, the limit, the largest part and, with
    `name` (a Config.check naming function), the settings that size it, those in `first` first."""
    parts = estimate(config, training, checkpoint)
    total = sum(parts.values())
    limit, source = available_memory()
    if limit is None or total <= limit:
        return None
    largest = max(parts, key=parts.get)
    sentence = (f"needs about {size_text(total)} of memory, more than the {size_text(limit)} available ({source}): "
                f"the largest part is {PARTS[largest]} ({size_text(parts[largest])})")
    settings = sorted(SIZED_BY.get(largest, ()), key=lambda setting: setting not in first)
    if name is not None and settings:
        names = [name(setting) for setting in settings]
        sentence += f"; make {', '.join(names[:-1]) + ' or ' if len(names) > 1 else ''}{names[-1]} smaller"
    return largest, sentence


def unknown(config, training=True, checkpoint=False):
    """A note to print when the memory available cannot be known, else None."""
    limit, source = available_memory()
    if limit is not None:
        return None
    return (f"this run needs about {size_text(sum(estimate(config, training, checkpoint).values()))} of memory; "
            f"{source}, so it was not checked")
