from .attention import Attention, CrossDifferentialAttention, DifferentialAttention
from .gmu import GMU
from .mamba import Mamba
from .mlp import SwiGLU
from .norm import LayerNorm, RMSNorm, build_norm

__all__ = ["Attention", "CrossDifferentialAttention", "DifferentialAttention", "GMU", "LayerNorm", "Mamba", "RMSNorm", "SwiGLU", "build_norm"]
