"""Converters between samba_lm models and other code's checkpoints.

official: the .pth checkpoints of the official Samba training code (microsoft/Samba, lit_gpt), both ways.
hf_formats (imported on its own, as it needs transformers): transformers' Llama, Mistral and Mamba.
"""

from .official import OFFICIAL_CONFIGS, from_official, to_official

__all__ = ["OFFICIAL_CONFIGS", "from_official", "to_official"]
