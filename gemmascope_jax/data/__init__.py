"""Data: text sources -> packed token windows -> activation stream (or cache) -> batches.

src = open_source("embedded")                      # or files, jsonl, parquet, datasets dir
toks = PackedTokens(src, tok, seq_len=1024, batch_size=8, seed=0,
                    shard_index=jax.process_index(), shard_count=jax.process_count())
acts = ActivationStream(model, ["resid_post.9"], toks, batch_tokens=4096)
scalars = estimate_norm_scalars(acts, n_batches=10)  # {site: s}, E||x/s||^2 = 1
state = acts.get_state()                           # JSON-able; set_state resumes exactly
write_activation_cache("acts", acts, model="gemma-3-270m", seq_len=1024, max_tokens=10**7)
reader = ActivationCacheReader("acts", 4096, seed=0, num_epochs=None)  # same batch format
"""

from gemmascope_jax.data.activations import ActivationStream, estimate_norm_scalars, normalize
from gemmascope_jax.data.cache import (
    ActivationCacheReader,
    CacheError,
    read_manifest,
    write_activation_cache,
)
from gemmascope_jax.data.corpus import count_tokens, embedded_corpus, open_source
from gemmascope_jax.data.packing import PackedTokens
from gemmascope_jax.data.sources import (
    ConcatSource,
    HFDiskSource,
    JsonlSource,
    ListSource,
    ParquetSource,
    SourceError,
    SubsetSource,
    TextFileSource,
    encode_document,
    split_documents,
)

__all__ = [
    "ActivationCacheReader",
    "ActivationStream",
    "CacheError",
    "ConcatSource",
    "HFDiskSource",
    "JsonlSource",
    "ListSource",
    "PackedTokens",
    "ParquetSource",
    "SourceError",
    "SubsetSource",
    "TextFileSource",
    "count_tokens",
    "embedded_corpus",
    "encode_document",
    "estimate_norm_scalars",
    "normalize",
    "open_source",
    "read_manifest",
    "split_documents",
    "write_activation_cache",
]
