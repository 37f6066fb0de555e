"""The application on tinyattn: model definitions, and what trains and evaluates them on the toy tasks.

    from models import Config, build_model
    from models.training import Run, train

`train.py` is the command line over this package; benchmarks and experiments import it.
"""
from .config import ATTENTION_HEADS_USED, MODELS, POSITIONAL, Config, ConfigError
from .gpt import DecoderOnlyTransformer
from .rnn import RNNSeq2Seq
from .transformer import Seq2SeqTransformer


def build_model(config, vocab_size, device=None):
    """The model a Config names, with positions for the longest sequences it trains or is evaluated on
    (config.position_count: --eval-max-len's, or 0..N-1 for --randomized-positions N)."""
    common = dict(d_model=config.d_model, n_heads=config.heads, d_ff=config.d_ff, dropout=config.dropout,
                  seed=config.seed, device=device)
    positions = dict(max_len=config.position_count, positional=config.positional,
                     randomized_positions=config.randomized_positions is not None)
    if config.model == "transformer":
        return Seq2SeqTransformer(vocab_size, encoder_layers=config.layers, decoder_layers=config.layers, **positions,
                                  **common)
    if config.model == "gpt":
        return DecoderOnlyTransformer(vocab_size, num_layers=config.layers, **positions, **common)
    if config.model in ("rnn", "rnn-attention"):
        # --d-model is each GRU's hidden size (and the embedding size); --heads, --layers and --d-ff do not apply
        return RNNSeq2Seq(vocab_size, hidden_size=config.d_model, attention=config.model == "rnn-attention",
                          bidirectional=config.bidirectional, seed=config.seed, device=device)
    raise ValueError(f"unknown model {config.model!r}; expected one of {', '.join(MODELS)}")
