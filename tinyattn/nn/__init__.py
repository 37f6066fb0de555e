"""Layers and containers with PyTorch's names and habits."""
from . import init
from .attention import MultiHeadAttention
from .layers import GELU, Dropout, Embedding, LayerNorm, Linear, ReLU
from .module import Module, ModuleList, Parameter, Sequential
from .recurrent import AdditiveAttention, GRUCell, run_bidirectional_gru, run_gru
from .positions import (ALiBiPositionalBias, LearnedPositionalEncoding, RotaryPositionalEncoding,
                        SinusoidalPositionalEncoding, randomized_positions)
from .transformer import Decoder, DecoderLayer, Encoder, EncoderLayer, FeedForward
