"""A decoder-only (GPT-style) transformer for the same toy tasks.

One causal stack reads `BOS source SEP target EOS` and learns to predict each next
token; the loss counts only the target and its EOS. There is no separate encoder and no
cross-attention: the target positions attend back to the source tokens through the
same causal self-attention.
"""
import tinyattn as ta
from tinyattn import nn
from tinyattn.packing import Packing
from tinyattn.tasks import BOS, EOS, PAD, SEP, pad

from .decoding import greedy_loop
from .transformer import (DECODING_POSITIONS_SEED, attention_positional, draw_positions, embed_with_positions,
                          make_positional, training_generator)


def language_model_batch(batch, device=None):
    """Inputs and labels of a tasks.Batch as one sequence per row, labels only on target + EOS."""
    inputs, labels = [], []
    for source, target in zip(batch.sources, batch.targets):
        sequence = [BOS, *source, SEP, *target, EOS]
        inputs.append(sequence[:-1])
        labels.append([PAD] * (len(source) + 1) + [*target, EOS])
    return pad(inputs, device=device), pad(labels, device=device)


class DecoderOnlyTransformer(nn.Module):
    """Token embedding + positions, a causal pre-LN stack, output head. Positions as in
    models/transformer.py; without any (positional="none") the causal mask is the model's
    only clue to order, and it can count from it (Kazemnejad et al. 2023)."""

    def __init__(self, vocab_size, d_model=64, n_heads=4, num_layers=4, d_ff=256, dropout=0.0, max_len=64,
                 positional="learned", activation="relu", seed=0, device=None, randomized_positions=False):
        super().__init__()
        self.generator = ta.Generator(seed)
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.positional, self.randomized_positions = positional, randomized_positions
        self.embed = nn.Embedding(vocab_size, d_model, generator=self.generator, device=device)
        self.position = make_positional(positional, max_len, d_model, self.generator, device)
        self.blocks = nn.Encoder(num_layers, d_model, n_heads, d_ff, dropout=dropout, activation=activation,
                                 generator=self.generator, device=device, positional=attention_positional(positional))
        self.head = nn.Linear(d_model, vocab_size, generator=self.generator, device=device)

    def forward(self, tokens, need_weights=False, cache=None, offset=0, positions=None, packing=None):
        """Next-token logits (B, T, vocab) and, on request, each layer's self-attention weights.
        positions: None for offset, offset + 1, ...; else an integer tensor (B, T). packing
        (tinyattn.packing.Packing): where tokens holds tokens; with it no layer computes a
        padding row, and the logits are packed, (tokens, vocab)."""
        x = embed_with_positions(self, tokens, offset, positions, packing)
        hidden, weights = self.blocks(x, need_weights=need_weights, causal=True, cache=cache, positions=positions,
                                      packing=packing)
        return self.head(hidden), weights

    def forward_batch(self, batch):
        """Logits and labels of a tasks.Batch (language_model_batch), packed to the token rows
        (tinyattn.packing), so that no padding is computed: (tokens, vocab) and (tokens,)."""
        inputs, labels = language_model_batch(batch, device=batch.source.device)
        lengths = [len(source) + len(target) + 2 for source, target in zip(batch.sources, batch.targets)]
        positions = draw_positions(self, lengths, inputs.shape[1], inputs.device, training_generator(self))
        packing = Packing.of_lengths(lengths, inputs.shape[1], inputs.device)
        return self(inputs, positions=positions, packing=packing)[0], packing.pack(labels)

    @ta.no_grad()
    def greedy_decode(self, source, max_new_tokens, use_cache=True, need_weights=False):
        """Greedy continuation of `BOS source SEP` for each row of a padded (B, S) source batch.

        Rows are decoded in groups of equal source length, so no prompt needs padding.
        With need_weights, each row gets the attention of its generated tokens on its
        source tokens, (layers, heads, generated, source length). Randomized positions are
        drawn once per group, for the prompt and every generated token but the last.
        """
        rows = source.tolist()
        lengths = [sum(1 for token in row if token != PAD) for row in rows]
        if max(lengths) + 1 + max_new_tokens > self.max_len:
            raise ValueError(f"cannot decode {max_new_tokens} tokens after a source of {max(lengths)}: "
                             f"the model's positions stop at max_len {self.max_len}")
        results, maps = [None] * len(rows), [None] * len(rows)
        generator = ta.Generator(DECODING_POSITIONS_SEED)
        for length in sorted(set(lengths)):
            members = [i for i, n in enumerate(lengths) if n == length]
            prompts = ta.tensor([[BOS, *rows[i][:length], SEP] for i in members], dtype=ta.int64, device=source.device)
            reached = length + 1 + max_new_tokens  # the prompt, BOS source SEP, and every generated token but the last
            positions = draw_positions(self, [reached] * len(members), reached, source.device, generator)
            generated, attention = greedy_loop(self._step(length, use_cache, need_weights, positions), prompts,
                                               max_new_tokens, need_weights)
            for position, i in enumerate(members):
                results[i] = generated[position]
                maps[i] = attention[position] if need_weights else None
        return results, (maps if need_weights else None)

    def _step(self, source_length, use_cache, need_weights, positions):
        cache = self.blocks.new_cache() if use_cache else None

        def step(prefix):
            fed = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0  # positions already in the cache
            start = fed if use_cache else 0
            logits, weights = self(prefix[:, start:], need_weights=need_weights, cache=cache, offset=start,
                                   positions=None if positions is None else positions[:, start:prefix.shape[1]])
            on_source = (ta.stack([w[:, :, -1, 1:1 + source_length] for w in weights], axis=1) if need_weights else None)
            return logits[:, -1], on_source

        return step
