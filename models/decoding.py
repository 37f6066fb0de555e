"""Greedy decoding shared by the models: pick the likeliest next token until every row has said EOS."""
import tinyattn as ta
from tinyattn.tasks import BOS, EOS, PAD


def greedy_loop(step, prefix, max_new_tokens, need_weights=False):
    """Run `step(prefix) -> (logits of the last position (B, vocab), weights (B, layers, heads, S) or None)`.

    `prefix` (B, P) holds the tokens fed so far; each step appends the argmax token.
    Returns the generated rows (lists of ids up to and including EOS) and, with
    need_weights, one array (layers, heads, generated, S) per row.
    """
    batch = prefix.shape[0]
    generated, finished, weight_steps = [], [False] * batch, []
    for _ in range(max_new_tokens):
        logits, weights = step(prefix)
        tokens = [PAD if done else token for token, done in zip(logits.argmax(axis=-1).tolist(), finished)]
        generated.append(tokens)
        if need_weights:
            weight_steps.append(weights)
        finished = [done or token == EOS for token, done in zip(tokens, finished)]
        if all(finished):
            break
        prefix = ta.concatenate([prefix, ta.tensor([[t] for t in tokens], dtype=ta.int64, device=prefix.device)], axis=1)
    rows = [_until_eos([tokens[row] for tokens in generated]) for row in range(batch)]
    if not need_weights:
        return rows, None
    maps = ta.stack(weight_steps, axis=3)  # (B, layers, heads, steps, S)
    return rows, [maps[row, :, :, :len(tokens)].numpy() for row, tokens in enumerate(rows)]


def decode_from_bos(step, source, max_new_tokens, need_weights=False):
    """greedy_loop for an encoder-decoder: every row starts from BOS, and each row's
    attention map keeps only the columns of its own (unpadded) source."""
    start = ta.full((source.shape[0], 1), BOS, dtype=ta.int64, device=source.device)
    rows, maps = greedy_loop(step, start, max_new_tokens, need_weights)
    if not need_weights:
        return rows, None
    lengths = (source != PAD).numpy().sum(axis=1).tolist()
    return rows, [row_map[..., :length] for row_map, length in zip(maps, lengths)]


def _until_eos(tokens):
    """Tokens up to and including the first EOS (the padding after it dropped)."""
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens
