"""The application on tinyattn: model definitions, and what trains and evaluates them on the toy tasks.

    from models import Config, build_model
    from models.training import Run, train

`train.py` is the command line over this package; benchmarks and experiments import it.
"""
from .config import ATTENTION_HEADS_USED, MODELS, Config, ConfigError
from .gpt import DecoderOnlyTransformer
from .rnn import RNNSeq2Seq
from .transformer import Seq2SeqTransformer


def build_model(config, vocab_size, device=None):
    """The model a Config names, sized for its task's longest sequences."""
    common = dict(d_model=config.d_model, n_heads=config.heads, d_ff=config.d_ff, dropout=config.dropout,
                  seed=config.seed, device=device)
    if config.model == "transformer":
        # decoder input is BOS + target: max_len + 1 positions
        return Seq2SeqTransformer(vocab_size, encoder_layers=config.layers, decoder_layers=config.layers,
                                  max_len=config.max_len + 1, **common)
    if config.model == "gpt":
        # BOS source SEP target (EOS is only ever a label): 2 * max_len + 2 positions
        return DecoderOnlyTransformer(vocab_size, num_layers=config.layers, max_len=2 * config.max_len + 2, **common)
    if config.model in ("rnn", "rnn-attention"):
        # --d-model is each GRU's hidden size (and the embedding size); --heads, --layers and --d-ff do not apply
        return RNNSeq2Seq(vocab_size, hidden_size=config.d_model, attention=config.model == "rnn-attention",
                          bidirectional=config.bidirectional, seed=config.seed, device=device)
    raise ValueError(f"unknown model {config.model!r}; expected one of {', '.join(MODELS)}")
