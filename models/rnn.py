"""GRU encoder-decoders, with and without attention: the models attention was invented to fix.

The encoder reads the source one token at a time with two GRUs, one first to last and
one last to first, as RNNsearch does (Bahdanau, Cho and Bengio 2014). Each position's
annotation is its two states side by side, so it has read the whole source. Without
attention (`--model rnn`) the decoder starts from both directions' final states and sees
nothing else: the whole source must fit in that one fixed-size vector. With additive
attention (`--model rnn-attention`) the decoder starts the same way, then scores every
annotation at every step and reads their weighted sum, so no position is out of reach.
Both models share the encoder, so comparing them isolates attention.

`bidirectional=False` (`--no-bidirectional`) is the one-directional encoder that
checkpoints written before the bidirectional one hold: its annotations are the forward
states alone and the decoder starts from the last of them.
"""
import tinyattn as ta
from tinyattn import nn
from tinyattn.tasks import PAD

from .decoding import decode_from_bos


class RNNSeq2Seq(nn.Module):
    """Token embedding, a GRU encoder (both directions by default), a GRU decoder
    (optionally with additive attention), output head.

    The loop over time is the model's: the engine sees one GRU step after another.
    hidden_size is each encoder direction's and the decoder's.
    """

    def __init__(self, vocab_size, hidden_size=128, embed_size=None, attention=False, bidirectional=True, seed=0,
                 device=None):
        super().__init__()
        self.generator = ta.Generator(seed)
        embed_size = embed_size or hidden_size
        make = dict(generator=self.generator, device=device)
        self.vocab_size, self.hidden_size, self.max_len = vocab_size, hidden_size, None  # no positions, no length limit
        self.embed = nn.Embedding(vocab_size, embed_size, **make)
        self.encoder = nn.GRUCell(embed_size, hidden_size, **make)  # the forward direction
        self.encoder_reverse = nn.GRUCell(embed_size, hidden_size, **make) if bidirectional else None
        # The decoder's first state from both final states: tanh(W [forward last; backward first] + b),
        # as RNNsearch starts from tanh(W_s h_backward_1), with the forward state's summary too.
        self.bridge = nn.Linear(2 * hidden_size, hidden_size, **make) if bidirectional else None
        annotation_size = 2 * hidden_size if bidirectional else hidden_size
        context = annotation_size if attention else 0
        self.decoder = nn.GRUCell(embed_size + context, hidden_size, **make)
        self.attention = nn.AdditiveAttention(hidden_size, annotation_size, hidden_size, **make) if attention else None
        self.head = nn.Linear(hidden_size + context, vocab_size, **make)

    def encode(self, source):
        """The annotations (B, S, 2 hidden, or hidden one-directional), the decoder's first state and the padding mask."""
        mask = source != PAD
        inputs = self._embed_columns(source)
        if self.encoder_reverse is None:
            states, last = nn.run_gru(self.encoder, inputs, mask)
            return states, last, mask
        annotations, final_states = nn.run_bidirectional_gru(self.encoder, self.encoder_reverse, inputs, mask)
        return annotations, self.bridge(final_states).tanh(), mask

    def _embed_columns(self, tokens):
        """One (B, embed) tensor per time step, embedded column by column (see nn.run_gru)."""
        return [self.embed(tokens[:, t]) for t in range(tokens.shape[1])]

    def _decoder_step(self, token_embedding, state, memory):
        """One decoder step: (logits (B, vocab), new state, attention weights (B, S) or None)."""
        states, projected_keys, mask = memory
        if self.attention is None:
            state = self.decoder(token_embedding, state)
            return self.head(state), state, None
        context, weights = self.attention(state, states, projected_keys=projected_keys, mask=mask)
        state = self.decoder(ta.concatenate([token_embedding, context], axis=-1), state)
        return self.head(ta.concatenate([state, context], axis=-1)), state, weights

    def _memory(self, states, mask):
        return states, (self.attention.project_keys(states) if self.attention is not None else None), mask

    def forward(self, source, decoder_input):
        """Teacher-forced logits (B, T, vocab)."""
        states, state, mask = self.encode(source)
        memory = self._memory(states, mask)
        logits = []
        for token_embedding in self._embed_columns(decoder_input):
            step_logits, state, _ = self._decoder_step(token_embedding, state, memory)
            logits.append(step_logits)
        return ta.stack(logits, axis=1)

    def forward_batch(self, batch):
        return self(batch.source, batch.decoder_input), batch.labels

    @ta.no_grad()
    def greedy_decode(self, source, max_new_tokens, use_cache=True, need_weights=False):
        """Greedy decoding, each row stopping at its EOS. The GRU state is the cache, so
        use_cache changes nothing. With need_weights (attention model only), each row's
        attention as an array (1 layer, 1 head, generated, source length)."""
        states, last, mask = self.encode(source)
        memory = self._memory(states, mask)
        carried = {"state": last}
        want_weights = need_weights and self.attention is not None

        def step(prefix):
            logits, carried["state"], weights = self._decoder_step(self.embed(prefix[:, -1]), carried["state"], memory)
            return logits, (weights[:, None, None, :] if want_weights else None)

        return decode_from_bos(step, source, max_new_tokens, want_weights)
