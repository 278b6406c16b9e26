from .attention import Attention
from .mamba import Mamba
from .mlp import SwiGLU
from .norm import LayerNorm, RMSNorm, build_norm

__all__ = ["Attention", "LayerNorm", "Mamba", "RMSNorm", "SwiGLU", "build_norm"]
