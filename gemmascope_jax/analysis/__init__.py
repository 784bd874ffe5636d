"""Analysis tools for Gemma 3 chat models: feature inspection, steering, refusal and jailbreak
analysis, chain-of-thought views, attribution graphs and the feature dashboard."""

from gemmascope_jax.analysis.common import check_chat, check_dictionary, check_latents, prompt_ids

__all__ = ["check_chat", "check_dictionary", "check_latents", "prompt_ids"]
