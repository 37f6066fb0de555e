"""The encoder-decoder transformer for the toy sequence tasks (the default model of train.py).

The encoder reads the whole source. The decoder writes the target one token at a time;
at each step its cross-attention looks back at every source position and weighs them.
For reversal those weights form an anti-diagonal: output i looks at input n - 1 - i.
"""
import tinyattn as ta
from tinyattn import nn
from tinyattn.tasks import PAD

from .decoding import decode_from_bos

POSITIONAL = {"learned": nn.LearnedPositionalEncoding, "sinusoidal": nn.SinusoidalPositionalEncoding}


def key_padding_mask(tokens):
    """(B, 1, 1, S) boolean mask: True where a key is a real token, so attention skips padding."""
    return (tokens != PAD)[:, None, None, :]


def make_positional(kind, max_len, d_model, generator, device):
    if kind not in POSITIONAL:
        raise ValueError(f"unknown positional encoding {kind!r}; expected one of {', '.join(POSITIONAL)}")
    if kind == "learned":
        return nn.LearnedPositionalEncoding(max_len, d_model, generator=generator, device=device)
    return nn.SinusoidalPositionalEncoding(d_model, max_len=max_len, device=device)


class Seq2SeqTransformer(nn.Module):
    """Token embedding (shared by source and target) + positions, pre-LN encoder and decoder, output head."""

    def __init__(self, vocab_size, d_model=64, n_heads=4, encoder_layers=2, decoder_layers=2, d_ff=256,
                 dropout=0.0, max_len=64, positional="learned", activation="relu", seed=0, device=None):
        super().__init__()
        self.generator = generator = ta.Generator(seed)  # weights, then dropout masks; its state is checkpointed
        stack = dict(dropout=dropout, activation=activation, generator=generator, device=device)
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model, generator=generator, device=device)
        self.position = make_positional(positional, max_len, d_model, generator, device)
        self.encoder = nn.Encoder(encoder_layers, d_model, n_heads, d_ff, **stack)
        self.decoder = nn.Decoder(decoder_layers, d_model, n_heads, d_ff, **stack)
        self.head = nn.Linear(d_model, vocab_size, generator=generator, device=device)

    def encode(self, source, need_weights=False):
        """Encoder states (B, S, d_model), the key padding mask and, on request, self-attention weights."""
        mask = key_padding_mask(source)
        memory, weights = self.encoder(self.position(self.embed(source)), mask=mask, need_weights=need_weights)
        return memory, mask, weights

    def decode(self, decoder_input, memory, memory_mask, need_weights=False, cache=None, offset=0):
        """Logits (B, T, vocab) for each decoder position; with a cache, only the new positions are fed."""
        x = self.position(self.embed(decoder_input), offset=offset)
        hidden, weights = self.decoder(x, memory, memory_mask=memory_mask, need_weights=need_weights, cache=cache)
        return self.head(hidden), weights

    def forward(self, source, decoder_input, need_weights=False):
        """Teacher-forced logits (B, T, vocab), and the attention weights when need_weights=True:
        {'encoder': [per layer (B, h, S, S)], 'decoder': [per layer {'self': ..., 'cross': (B, h, T, S)}]}."""
        memory, mask, encoder_weights = self.encode(source, need_weights)
        logits, decoder_weights = self.decode(decoder_input, memory, mask, need_weights)
        return logits, ({"encoder": encoder_weights, "decoder": decoder_weights} if need_weights else None)

    def forward_batch(self, batch):
        """Logits and labels of a tasks.Batch, for the loss: (B, T, vocab) and (B, T)."""
        return self(batch.source, batch.decoder_input)[0], batch.labels

    @ta.no_grad()
    def greedy_decode(self, source, max_new_tokens, use_cache=True, need_weights=False):
        """Greedy decoding of a padded (B, S) source batch; each row stops at its EOS.

        Returns the generated rows (lists of ids, EOS included when produced) and, with
        need_weights, each row's cross-attention as an array (layers, heads, generated, S).
        With use_cache=False every step re-runs the decoder over the whole prefix: the
        slow way, kept to show what the key/value cache saves.
        """
        if max_new_tokens > self.max_len:  # every generated token but the last is fed back at a new position
            raise ValueError(f"cannot decode {max_new_tokens} tokens: the model's positions stop at max_len {self.max_len}")
        memory, mask, _ = self.encode(source)
        cache = self.decoder.new_cache() if use_cache else None

        def step(prefix):
            position = prefix.shape[1] - 1
            feed, offset = (prefix[:, -1:], position) if use_cache else (prefix, 0)
            logits, weights = self.decode(feed, memory, mask, need_weights=need_weights, cache=cache, offset=offset)
            cross = ta.stack([layer["cross"][:, :, -1] for layer in weights], axis=1) if need_weights else None
            return logits[:, -1], cross

        return decode_from_bos(step, source, max_new_tokens, need_weights)
