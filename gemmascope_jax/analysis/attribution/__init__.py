"""Attribution graphs for transcoders and CLTs: the replacement model (`replacement`), the
backward pass that builds a graph (`attribute`), pruning and files (`graph`), circuit-tracer's
replacement/completeness scores (`graph_quality`) and the row store behind large graphs
(`row_store`). The public names are re-exported by `gemmascope_jax.analysis`.
"""
