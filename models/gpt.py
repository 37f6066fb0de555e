"""A decoder-only (GPT-style) transformer for the same toy tasks.

One causal stack reads `BOS source SEP target EOS` and learns to predict each next
token; the loss counts only the target and its EOS. There is no separate encoder and no
cross-attention: the target positions attend back to the source tokens through the
same causal self-attention.
"""
import tinyattn as ta
from tinyattn import nn
from tinyattn.tasks import BOS, EOS, PAD, SEP, pad

from .decoding import greedy_loop
from .transformer import make_positional


def language_model_batch(batch, device=None):
    """Inputs and labels of a tasks.Batch as one sequence per row, labels only on target + EOS."""
    inputs, labels = [], []
    for source, target in zip(batch.sources, batch.targets):
        sequence = [BOS, *source, SEP, *target, EOS]
        inputs.append(sequence[:-1])
        labels.append([PAD] * (len(source) + 1) + [*target, EOS])
    return pad(inputs, device=device), pad(labels, device=device)


class DecoderOnlyTransformer(nn.Module):
    """Token embedding + positions, a causal pre-LN stack, output head."""

    def __init__(self, vocab_size, d_model=64, n_heads=4, num_layers=4, d_ff=256, dropout=0.0, max_len=64,
                 positional="learned", activation="relu", seed=0, device=None):
        super().__init__()
        self.generator = ta.Generator(seed)
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model, generator=self.generator, device=device)
        self.position = make_positional(positional, max_len, d_model, self.generator, device)
        self.blocks = nn.Encoder(num_layers, d_model, n_heads, d_ff, dropout=dropout, activation=activation,
                                 generator=self.generator, device=device)
        self.head = nn.Linear(d_model, vocab_size, generator=self.generator, device=device)

    def forward(self, tokens, need_weights=False, cache=None, offset=0):
        """Next-token logits (B, T, vocab) and, on request, each layer's self-attention weights."""
        hidden, weights = self.blocks(self.position(self.embed(tokens), offset=offset), need_weights=need_weights,
                                      causal=True, cache=cache)
        return self.head(hidden), weights

    def forward_batch(self, batch):
        inputs, labels = language_model_batch(batch, device=batch.source.device)
        return self(inputs)[0], labels

    @ta.no_grad()
    def greedy_decode(self, source, max_new_tokens, use_cache=True, need_weights=False):
        """Greedy continuation of `BOS source SEP` for each row of a padded (B, S) source batch.

        Rows are decoded in groups of equal source length, so no prompt needs padding.
        With need_weights, each row gets the attention of its generated tokens on its
        source tokens, (layers, heads, generated, source length).
        """
        rows = source.tolist()
        lengths = [sum(1 for token in row if token != PAD) for row in rows]
        if max(lengths) + 1 + max_new_tokens > self.max_len:
            raise ValueError(f"cannot decode {max_new_tokens} tokens after a source of {max(lengths)}: "
                             f"the model's positions stop at max_len {self.max_len}")
        results, maps = [None] * len(rows), [None] * len(rows)
        for length in sorted(set(lengths)):
            members = [i for i, n in enumerate(lengths) if n == length]
            prompts = ta.tensor([[BOS, *rows[i][:length], SEP] for i in members], dtype=ta.int64, device=source.device)
            generated, attention = greedy_loop(self._step(length, use_cache, need_weights), prompts, max_new_tokens, need_weights)
            for position, i in enumerate(members):
                results[i] = generated[position]
                maps[i] = attention[position] if need_weights else None
        return results, (maps if need_weights else None)

    def _step(self, source_length, use_cache, need_weights):
        cache = self.blocks.new_cache() if use_cache else None

        def step(prefix):
            fed = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0  # positions already in the cache
            feed = prefix[:, fed:] if use_cache else prefix
            logits, weights = self(feed, need_weights=need_weights, cache=cache, offset=fed if use_cache else 0)
            on_source = (ta.stack([w[:, :, -1, 1:1 + source_length] for w in weights], axis=1) if need_weights else None)
            return logits[:, -1], on_source

        return step
