"""Mistral: the LLaMA layout with sliding-window attention (which pruning does not touch)."""

from dataclasses import replace

from .llama import LLAMA

MISTRAL = replace(LLAMA, name="mistral", architectures=("MistralForCausalLM",), model_types=("mistral",))
