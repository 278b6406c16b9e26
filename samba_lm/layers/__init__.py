from .attention import Attention
from .mamba import Mamba
from .mlp import SwiGLU
from .norm import RMSNorm

__all__ = ["Attention", "Mamba", "RMSNorm", "SwiGLU"]
