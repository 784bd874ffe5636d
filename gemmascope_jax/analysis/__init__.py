"""Analysis tools for Gemma 3 chat models: feature inspection, steering, refusal and jailbreak
analysis, chain-of-thought views, attribution graphs and the feature dashboard.

    import gemmascope_jax as gsj
    from gemmascope_jax.data.corpus import embedded_corpus
    model, tok = gsj.load_gemma3()
    d = gsj.load_dictionary("runs/demo/export/resid_post_9_matryoshka/native")
    rep = gsj.analysis.top_features(model, tok, d, "The Eiffel Tower is in Paris", k=10)
    lens = gsj.analysis.logit_lens(model, d, 123, tokenizer=tok)
    res = gsj.analysis.steer(model, tok, d, "I think that", [123], alpha=8.0)
    batches = gsj.analysis.corpus_batches(embedded_corpus(), tok, max_tokens=16384)
    ex = gsj.analysis.scan_corpus(model, d, batches, tokenizer=tok)
    gsj.analysis.build_dashboard(model, tok, d, ex, "out/dashboard")
    harmful = [gsj.analysis.prompt_ids(tok, [{"role": "user", "content": p}])
               for p in gsj.analysis.load_prompt_set("harmful")]

Every tool returns plain data (frozen dataclasses with numpy arrays, `to_json()`), and has a
CLI verb: `inspect`, `dashboard`, `steer`, `refusal`, `jailbreak`, `cot`, `attribute`.
"""

from gemmascope_jax.analysis.attribution.attribute import attribute, select_logits
from gemmascope_jax.analysis.attribution.graph import (
    AttributionGraph,
    graph_json,
    prune_graph,
    write_graph_files,
)
from gemmascope_jax.analysis.attribution.replacement import ReplacementModel, intervene
from gemmascope_jax.analysis.chat.cot import CoTView, cot_from_response, cot_generate, cot_view
from gemmascope_jax.analysis.chat.jailbreak import (
    WRAPPERS,
    JailbreakDiff,
    compare_jailbreak,
    jailbreak_diff,
)
from gemmascope_jax.analysis.chat.refusal import (
    AlignedLatents,
    RefusalReport,
    aligned_latents,
    load_prompt_set,
    refusal_analysis,
)
from gemmascope_jax.analysis.chat.refusal_ablation import (
    REFUSAL_PHRASES,
    RefusalRates,
    ablate_direction,
    ablation_interventions,
    ablation_refusal_rates,
    is_refusal,
    refusal_rate,
)
from gemmascope_jax.analysis.chat.refusal_direction import RefusalDirection, refusal_direction
from gemmascope_jax.analysis.common import check_dictionary, check_latents
from gemmascope_jax.analysis.dashboard import build_dashboard
from gemmascope_jax.analysis.features import FeatureReport, top_features
from gemmascope_jax.analysis.logit_lens import LogitLens, logit_lens, logit_lens_table
from gemmascope_jax.analysis.max_examples import MaxExamples, corpus_batches, scan_corpus
from gemmascope_jax.analysis.steering import (
    SteeringResult,
    ablate_interventions,
    clamp_interventions,
    combine_interventions,
    decoder_direction,
    splice_interventions,
    steer,
    steer_interventions,
)
from gemmascope_jax.gemma3.tokenizer import check_chat, prompt_ids

__all__ = [
    "AttributionGraph",
    "ReplacementModel",
    "attribute",
    "graph_json",
    "intervene",
    "prune_graph",
    "select_logits",
    "write_graph_files",
    "REFUSAL_PHRASES",
    "WRAPPERS",
    "AlignedLatents",
    "CoTView",
    "FeatureReport",
    "JailbreakDiff",
    "LogitLens",
    "MaxExamples",
    "RefusalDirection",
    "RefusalRates",
    "RefusalReport",
    "SteeringResult",
    "ablate_direction",
    "ablate_interventions",
    "ablation_interventions",
    "ablation_refusal_rates",
    "aligned_latents",
    "build_dashboard",
    "check_chat",
    "check_dictionary",
    "check_latents",
    "clamp_interventions",
    "combine_interventions",
    "compare_jailbreak",
    "corpus_batches",
    "cot_from_response",
    "cot_generate",
    "cot_view",
    "decoder_direction",
    "is_refusal",
    "jailbreak_diff",
    "load_prompt_set",
    "logit_lens",
    "logit_lens_table",
    "prompt_ids",
    "refusal_analysis",
    "refusal_direction",
    "refusal_rate",
    "scan_corpus",
    "splice_interventions",
    "steer",
    "steer_interventions",
    "top_features",
]
