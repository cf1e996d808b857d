"""Batched, lossless decoding loops on the reference models: autoregressive, chain and
tree speculation, with n-gram, layer-skipping and model drafters, and self-speculation
over a sparse KV cache."""

from .drafters import Draft, ModelDrafter, NgramDrafter, layerskip
from .selfspec import KVPolicy, SelfSpecDrafter
from .generate import METHODS, GenerationResult, GenerationStats, encode_prompts, generate, make_drafter

__all__ = ["Draft", "ModelDrafter", "NgramDrafter", "layerskip", "METHODS", "GenerationResult", "GenerationStats",
           "encode_prompts", "generate", "make_drafter", "KVPolicy", "SelfSpecDrafter"]
