"""Qwen2 / Qwen2.5: the LLaMA layout; q/k/v always carry a bias, sliced with their rows."""

from dataclasses import replace

from .llama import LLAMA

QWEN2 = replace(LLAMA, name="qwen2", architectures=("Qwen2ForCausalLM",), model_types=("qwen2",), bias_roles=("q", "k", "v"))
