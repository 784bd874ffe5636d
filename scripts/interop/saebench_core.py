"""SAEBench 0.6.0's core eval on a SAELens-format SAE, a transformers Gemma 3 folder and fixed
tokens; runs in .venv-interop (tests/test_evaluate.py compares with `gemmascope-jax evaluate`).

    python scripts/interop/saebench_core.py MODEL_DIR SAE_DIR TOKENS.npy OUT.json \
        --batch-size 2 --ignore 0 1 2 105 106

The model is wrapped in TransformerLens' `HookedTransformer` (what SAEBench evaluates with),
built offline from the folder's config through TransformerLens' own Gemma 3 weight conversion;
the script checks first that its logits match transformers' (printed: `tl_vs_hf_max_abs`).
SAEBench reads its tokens from an `ActivationsStore`; a stand-in store hands it TOKENS in
batches of `--batch-size` rows, in order, so both sides see the same batches. Everything else
is SAEBench's: `run_evals` with every core metric on and
`exclude_special_tokens_from_reconstruction=True`, the weight-based feature metrics and
`calculate_misc_metrics`. OUT.json holds SAEBench's metric groups (`metrics`) and the largest
logit difference between TransformerLens and transformers.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def hooked_gemma3(model_dir: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights
    from transformers import Gemma3ForCausalLM

    hf = Gemma3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    c = hf.config
    rope = getattr(c, "rope_parameters", None) or {}
    local_base = (rope.get("sliding_attention") or {}).get("rope_theta", 10_000.0)
    global_base = (rope.get("full_attention") or {}).get("rope_theta", c.rope_theta)
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.head_dim,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        rotary_base=global_base,
        rotary_base_local=local_base,
        rotary_dim=c.head_dim,
        positional_embedding_type="rotary",
        use_attn_scale=True,
        n_key_value_heads=c.num_key_value_heads,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        window_size=c.sliding_window,
        use_local_attn=True,
        attn_types=["global" if t == "full_attention" else "local" for t in c.layer_types],
        original_architecture="Gemma3ForCausalLM",
        model_name="gemma-3-tiny",
        dtype=torch.float32,
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gemma_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval(), hf


class FixedTokens:
    """The part of SAELens' `ActivationsStore` that SAEBench's core eval uses."""

    def __init__(self, tokens: np.ndarray, batch_size: int):
        self.tokens = torch.as_tensor(tokens, dtype=torch.long)
        self.store_batch_size_prompts = batch_size
        self.context_size = tokens.shape[1]
        self.i = 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        out = self.tokens[self.i : self.i + n]
        self.i += n
        return out

    def reset_input_dataset(self) -> None:
        self.i = 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("sae_dir")
    p.add_argument("tokens")
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--ignore", type=int, nargs="*", default=[0, 1, 2])
    args = p.parse_args()

    import sae_bench.sae_bench_utils.general_utils as general_utils
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import (
        calculate_misc_metrics,
        get_featurewise_weight_based_metrics,
        run_evals,
    )
    from sae_lens import SAE

    torch.manual_seed(0)
    model, hf = hooked_gemma3(args.model_dir)
    tokens = np.load(args.tokens)
    with torch.no_grad():
        t = torch.as_tensor(tokens, dtype=torch.long)
        diff = (model(t, return_type="logits") - hf(t).logits).abs().max().item()
    sae = SAE.load_from_disk(args.sae_dir, device="cpu")
    _, sae, _ = general_utils.load_and_format_sae("custom", sae, "cpu")  # as multiple_evals
    n_batches = -(-len(tokens) // args.batch_size)
    cfg = CoreEvalConfig(
        batch_size_prompts=args.batch_size,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        context_size=tokens.shape[1],
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True,
    )
    metrics, features = run_evals(
        sae,
        FixedTokens(tokens, args.batch_size),
        model,
        cfg,
        ignore_tokens=set(args.ignore),
    )
    features |= get_featurewise_weight_based_metrics(sae)
    metrics["misc_metrics"] = calculate_misc_metrics(features)
    out = {"metrics": metrics, "tl_vs_hf_max_abs": diff, "hook_name": sae.cfg.hook_name}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
