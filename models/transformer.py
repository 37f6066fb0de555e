"""The encoder-decoder transformer for the toy sequence tasks (the default model of train.py).

The encoder reads the whole source. The decoder writes the target one token at a time;
at each step its cross-attention looks back at every source position and weighs them.
For reversal those weights form an anti-diagonal: output i looks at input n - 1 - i.

Positions (`positional`, shared with models/gpt.py): learned or sinusoidal vectors added
to the embeddings, rope or alibi inside every attention, or none. The source and the
target are each counted from 0, so target position i and source position i share one
place, in cross-attention too. With randomized_positions (Ruoss et al. 2023) each
sequence's positions are a sorted random subset of 0..max_len-1, in training and at test.
"""
import tinyattn as ta
from tinyattn import nn
from tinyattn.creation import shard_generator
from tinyattn.packing import Packing
from tinyattn.tasks import PAD

from .config import POSITIONAL
from .decoding import decode_from_bos

IN_ATTENTION = ("rope", "alibi")
# Randomized positions at test time are drawn afresh from this seed at every decode, so the same
# weights always get the same evaluation.
DECODING_POSITIONS_SEED = 0


def key_padding_mask(tokens):
    """(B, 1, 1, S) boolean mask: True where a key is a real token, so attention skips padding."""
    return (tokens != PAD)[:, None, None, :]


def make_positional(kind, max_len, d_model, generator, device):
    """The encoding added to the token embeddings; None for positions inside attention or none at all."""
    if kind not in POSITIONAL:
        raise ValueError(f"unknown positional encoding {kind!r}; expected one of {', '.join(POSITIONAL)}")
    if kind == "learned":
        return nn.LearnedPositionalEncoding(max_len, d_model, generator=generator, device=device)
    if kind == "sinusoidal":
        return nn.SinusoidalPositionalEncoding(d_model, max_len=max_len, device=device)
    return None


def attention_positional(kind):
    """What the attention layers take for a model's `positional`: rope, alibi, or None."""
    return kind if kind in IN_ATTENTION else None


def embed_with_positions(model, tokens, offset=0, positions=None, packing=None):
    """The tokens' embeddings, plus the model's positional encoding where it adds one; packed
    to the token rows (tinyattn.packing) when a packing is given."""
    x = model.embed(tokens)
    if model.position is not None:
        x = model.position(x, offset=offset, positions=positions)
    return x if packing is None else packing.pack(x)


def draw_positions(model, lengths, width, device, generator):
    """Randomized positions (rows, width) for rows feeding `lengths` tokens, or None when the model
    counts 0, 1, 2, ... (nn.randomized_positions, from 0..model.max_len-1)."""
    if not model.randomized_positions:
        return None
    return nn.randomized_positions(lengths, model.max_len, generator, width, device)


def training_generator(model):
    """Where a training step's positions are drawn from: the generator of this shard of the batch
    (tinyattn.parallel), else the model's own (checkpointed with it)."""
    return shard_generator() or model.generator


class Seq2SeqTransformer(nn.Module):
    """Token embedding (shared by source and target) + positions, pre-LN encoder and decoder, output head."""

    def __init__(self, vocab_size, d_model=64, n_heads=4, encoder_layers=2, decoder_layers=2, d_ff=256,
                 dropout=0.0, max_len=64, positional="learned", activation="relu", seed=0, device=None,
                 randomized_positions=False):
        super().__init__()
        self.generator = generator = ta.Generator(seed)  # weights, then dropout masks; its state is checkpointed
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.positional, self.randomized_positions = positional, randomized_positions
        self.embed = nn.Embedding(vocab_size, d_model, generator=generator, device=device)
        self.position = make_positional(positional, max_len, d_model, generator, device)
        stack = dict(dropout=dropout, activation=activation, generator=generator, device=device,
                     positional=attention_positional(positional))
        self.encoder = nn.Encoder(encoder_layers, d_model, n_heads, d_ff, **stack)
        self.decoder = nn.Decoder(decoder_layers, d_model, n_heads, d_ff, **stack)
        self.head = nn.Linear(d_model, vocab_size, generator=generator, device=device)

    def encode(self, source, need_weights=False, positions=None, packing=None):
        """Encoder states (B, S, d_model), packed (source tokens, d_model) with a packing (tinyattn.packing),
        the key padding mask and, on request, self-attention weights."""
        mask = key_padding_mask(source)
        x = embed_with_positions(self, source, positions=positions, packing=packing)
        memory, weights = self.encoder(x, mask=mask, need_weights=need_weights, positions=positions, packing=packing)
        return memory, mask, weights

    def decode(self, decoder_input, memory, memory_mask, need_weights=False, cache=None, offset=0, positions=None,
               memory_positions=None, packing=None, memory_packing=None):
        """Logits (B, T, vocab) for each decoder position, packed (target tokens, vocab) with a packing;
        with a cache, only the new positions are fed. memory_packing: the memory's, when it is packed."""
        x = embed_with_positions(self, decoder_input, offset, positions, packing)
        hidden, weights = self.decoder(x, memory, memory_mask=memory_mask, need_weights=need_weights, cache=cache,
                                       positions=positions, memory_positions=memory_positions, packing=packing,
                                       memory_packing=memory_packing)
        return self.head(hidden), weights

    def forward(self, source, decoder_input, need_weights=False, source_positions=None, target_positions=None,
                source_packing=None, target_packing=None):
        """Teacher-forced logits (B, T, vocab), and the attention weights when need_weights=True:
        {'encoder': [per layer (B, h, S, S)], 'decoder': [per layer {'self': ..., 'cross': (B, h, T, S)}]}.
        Positions: None for 0, 1, 2, ...; else integer tensors (B, S) and (B, T). source_packing and
        target_packing (tinyattn.packing.Packing): where the two hold tokens; with them no layer
        computes a padding row, and the logits are packed, (target tokens, vocab)."""
        memory, mask, encoder_weights = self.encode(source, need_weights, source_positions, source_packing)
        logits, decoder_weights = self.decode(decoder_input, memory, mask, need_weights, positions=target_positions,
                                              memory_positions=source_positions, packing=target_packing,
                                              memory_packing=source_packing)
        return logits, ({"encoder": encoder_weights, "decoder": decoder_weights} if need_weights else None)

    def forward_batch(self, batch):
        """Logits and labels of a tasks.Batch's target tokens, for the loss: (tokens, vocab) and
        (tokens,), source and target packed (tinyattn.packing), so that no padding is computed.
        Randomized positions are one draw per row, the source taking the first of the target's."""
        source_length, target_length = batch.source.shape[1], batch.decoder_input.shape[1]
        device = batch.source.device
        packings = dict(
            source_packing=Packing.of_lengths([len(source) for source in batch.sources], source_length, device),
            target_packing=Packing.of_lengths([len(target) + 1 for target in batch.targets], target_length, device))
        labels = packings["target_packing"].pack(batch.labels)
        lengths = [max(len(source), len(target) + 1) for source, target in zip(batch.sources, batch.targets)]
        drawn = draw_positions(self, lengths, max(source_length, target_length), device, training_generator(self))
        if drawn is None:
            return self(batch.source, batch.decoder_input, **packings)[0], labels
        return self(batch.source, batch.decoder_input, source_positions=drawn[:, :source_length],
                    target_positions=drawn[:, :target_length], **packings)[0], labels

    @ta.no_grad()
    def greedy_decode(self, source, max_new_tokens, use_cache=True, need_weights=False):
        """Greedy decoding of a padded (B, S) source batch; each row stops at its EOS.

        Returns the generated rows (lists of ids, EOS included when produced) and, with
        need_weights, each row's cross-attention as an array (layers, heads, generated, S).
        With use_cache=False every step re-runs the decoder over the whole prefix: the
        slow way, kept to show what the key/value cache saves. Randomized positions are
        drawn once, for the longest the decode may reach (the source, or max_new_tokens).
        """
        if max_new_tokens > self.max_len:  # every generated token but the last is fed back at a new position
            raise ValueError(f"cannot decode {max_new_tokens} tokens: the model's positions stop at max_len {self.max_len}")
        width = max(source.shape[1], max_new_tokens)
        drawn = draw_positions(self, [width] * source.shape[0], width, source.device, ta.Generator(DECODING_POSITIONS_SEED))
        source_positions = None if drawn is None else drawn[:, :source.shape[1]]
        memory, mask, _ = self.encode(source, positions=source_positions)
        cache = self.decoder.new_cache() if use_cache else None

        def step(prefix):
            position = prefix.shape[1] - 1
            feed, offset = (prefix[:, -1:], position) if use_cache else (prefix, 0)
            positions = None if drawn is None else drawn[:, offset:position + 1]
            logits, weights = self.decode(feed, memory, mask, need_weights=need_weights, cache=cache, offset=offset,
                                          positions=positions, memory_positions=source_positions)
            cross = ta.stack([layer["cross"][:, :, -1] for layer in weights], axis=1) if need_weights else None
            return logits[:, -1], cross

        return decode_from_bos(step, source, max_new_tokens, need_weights)
