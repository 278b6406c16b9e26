"""samba-lm: Samba (Mamba + sliding-window attention + SwiGLU) that trains, streams and evaluates."""

from .checkpoint import load_pretrained, save_pretrained
from .config import PRESETS, SambaConfig
from .generation import generate, generate_stream, sample_next
from .model import SambaLM, SambaOutput
from .state import SambaState

__all__ = ["PRESETS", "SambaConfig", "SambaLM", "SambaOutput", "SambaState", "generate", "generate_stream",
           "load_pretrained", "sample_next", "save_pretrained"]
__version__ = "0.1.0"
