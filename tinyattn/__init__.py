"""tinyattn: a from-scratch autodiff engine and transformer on NumPy or CuPy."""
from .backend import (DeviceError, bool_, cuda_available, float16, float32, float64, get_default_device, int64,
                      set_default_device)
from .engine import Function, Tensor, enable_grad, grad, is_grad_enabled, no_grad, set_grad_enabled
from .creation import Generator, arange, full, manual_seed, ones, ones_like, rand, randn, tensor, zeros, zeros_like
from .ops import (abs, argmax, argmin, clip, concatenate, exp, gelu, log, masked_fill, matmul, max, maximum, mean, min,
                  minimum, relu, sigmoid, split, sqrt, stack, std, sum, tanh, var, where)
from .gradcheck import GradcheckError, gradcheck, gradgradcheck
from . import functional, kernels, nn, optim, profiler

profiler.enable_from_environment()

__version__ = "0.1.0"
