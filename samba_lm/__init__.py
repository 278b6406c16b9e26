"""samba-lm: Samba (Mamba + sliding-window attention + SwiGLU) that trains, streams and evaluates."""

from .checkpoint import load_pretrained, save_pretrained
from .config import PRESETS, SambaConfig
from .engine import DecodeEngine
from .generation import generate, generate_stream
from .model import SambaLM, SambaOutput
from .prompts import left_pad, prefill
from .sampling import sample_next
from .state import SambaState

__all__ = ["PRESETS", "DecodeEngine", "SambaConfig", "SambaLM", "SambaOutput", "SambaState", "generate",
           "generate_stream", "left_pad", "load_pretrained", "prefill", "sample_next", "save_pretrained"]
__version__ = "0.1.0"
