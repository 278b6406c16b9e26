from .attention import Attention, DifferentialAttention
from .mamba import Mamba
from .mlp import SwiGLU
from .norm import LayerNorm, RMSNorm, build_norm

__all__ = ["Attention", "DifferentialAttention", "LayerNorm", "Mamba", "RMSNorm", "SwiGLU", "build_norm"]
