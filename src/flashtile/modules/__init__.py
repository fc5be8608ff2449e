"""nn.Modules built on flashtile's public functions (no backend logic inside)."""

from .mha import MHA, InferenceParams, alibi_slopes

__all__ = ["MHA", "InferenceParams", "alibi_slopes"]
