"""Chat-model analysis: refusal directions and aligned latents (`refusal`,
`refusal_direction`, `refusal_ablation`), jailbreak wrappers (`jailbreak`) and
chain-of-thought views (`cot`). The public names are re-exported by `gemmascope_jax.analysis`.
"""
