"""Attribution graphs on the tiny Gemma 3: linearity, brute-force direct effects, agreement with
circuit-tracer 0.5.0 (its nnsight backend, in the interop venv), pruning, graph files,
interventions, transcoder-set loading, and circuit-tracer's replacement / completeness scores
(hand-built graphs, an independent dense computation, circuit-tracer's `compute_graph_scores`
on its own graph, pruned and unpruned, and `graph_quality` over prompts).

circuit-tracer contracts the token-embedding gradient with the unscaled embedding row while
Gemma adds the row times sqrt(d_model) to the residual stream, so its token edges are ours
divided by sqrt(d_model); every other edge must agree to 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope_jax.analysis.attribution.attribute import (
    ReplacementModel,
    _ActiveFeatures,
    _EdgeComputer,
    attribute,
    auto_batch_size,
    intervene,
)
from gemmascope_jax.analysis.attribution.graph import (
    AttributionGraph,
    graph_scores,
    partial_influence,
    prune_graph,
    write_graph_files,
)
from gemmascope_jax.analysis.attribution.graph_quality import graph_quality
from gemmascope_jax.analysis.attribution.replacement import _decoder_delta
from gemmascope_jax.analysis.attribution.row_store import RowStore
from gemmascope_jax.cli import run_verb
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.formats import FormatError
from gemmascope_jax.formats.sets import load_transcoder_set, save_transcoder_set

REPO = Path(__file__).resolve().parents[1]
INTEROP_PYTHON = REPO / ".venv-interop" / "bin" / "python"
INTEROP_STAMP = REPO / ".venv-interop" / ".installed"  # written by `make interop` when complete
PEER_SCRIPT = REPO / "scripts" / "interop" / "circuit_tracer_attribution.py"
TOKENS = np.array([2, 10, 50, 77, 300, 12, 99, 400, 5, 123])
NODE_FIELDS = [
    "node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
    "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation",
]  # fmt: skip


def _plt(n_layers=7, d=64, width=16, kind="skip_transcoder"):
    cfg = dict(kind=kind, architecture="jumprelu", d_in=d, d_out=d, width=width)
    members = [
        random_dictionary(DictionaryConfig(**cfg, layers=(i,), model_num_layers=n_layers), seed=i)
        for i in range(n_layers)
    ]
    return TranscoderSet.from_transcoders(members, metadata={"scan": "tiny-plt"})


def _clt(n_layers=7, d=64, width=8):
    cfg = DictionaryConfig(kind="clt", architecture="jumprelu", d_in=d, d_out=d, width=width,
                           layers=tuple(range(n_layers)), model_num_layers=n_layers)  # fmt: skip
    return random_dictionary(cfg, seed=3)


@pytest.fixture(scope="module")
def plt_built(tiny_model):
    rep = ReplacementModel.build(tiny_model, _plt(), TOKENS)
    return rep, attribute(rep, batch_size=32)


@pytest.fixture(scope="module")
def clt_built(tiny_model):
    rep = ReplacementModel.build(tiny_model, _clt(), TOKENS)
    return rep, attribute(rep, batch_size=32)


@pytest.fixture(params=["plt", "clt"])
def built(request):
    return request.getfixturevalue(f"{request.param}_built")


def _pre_activations(rep, graph, mlp_in, final):
    """Feature targets' `w_enc . mlp_in` and logit targets' demeaned logits, [S + K]."""
    feats = graph.active_features[graph.selected_features]
    pre = np.zeros(len(feats))
    for layer in np.unique(feats[:, 0]):
        rows = np.nonzero(feats[:, 0] == layer)[0]
        enc = np.asarray(rep.encoder_vectors(int(layer), feats[rows, 2]))
        pre[rows] = np.sum(np.asarray(mlp_in[layer])[feats[rows, 1]] * enc, axis=-1)
    logits = np.asarray(rep.unembed(final[-1]))
    demeaned = logits[graph.logit_tokens] - logits.mean()
    return np.concatenate([pre, demeaned])


def test_frozen_forward_reproduces_the_model(built):
    rep, _ = built
    mlp_in, final = rep.frozen_forward()
    np.testing.assert_allclose(mlp_in, rep.mlp_in, atol=2e-5)
    np.testing.assert_allclose(rep.unembed(final), rep.logits, atol=5e-5)


def test_rows_sum_to_pre_activations(built):
    """Sum of incoming edges (activation included) + the constant part (the frozen model
    with every node removed) = each feature's pre-activation and each demeaned logit."""
    rep, graph = built
    no_features = np.array(rep.mlp_add - rep.errors)
    for layer, codes in enumerate(rep.codes):
        block = np.asarray(rep.decoder_block(layer))
        no_features[layer : layer + block.shape[1]] -= np.einsum("tf,fjd->jtd", codes, block)
    const_in, const_final = rep.frozen_forward(no_features, np.zeros(rep.embed.shape, np.float32))
    full = _pre_activations(rep, graph, *rep.frozen_forward())
    const = _pre_activations(rep, graph, const_in, const_final)
    sums = graph.adjacency_rows.sum(axis=1, dtype=np.float64)
    np.testing.assert_allclose(sums + const, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_edges_match_brute_force_removal(built):
    """Independent direct effects: remove one source (feature, error or token) from the
    frozen model's inputs, rerun it, and compare every target's change with -edge."""
    rep, graph = built
    base = _pre_activations(rep, graph, *rep.frozen_forward())
    s, n_layers, t = graph.n_features, graph.n_layers, graph.n_pos
    rng = np.random.default_rng(0)
    feature_nodes = rng.choice(s, size=min(5, s), replace=False)
    error_nodes = s + rng.choice(n_layers * t, size=3, replace=False)
    token_nodes = s + n_layers * t + np.array([1, t - 1])
    errors = np.asarray(rep.errors)
    for node in [*feature_nodes, *error_nodes, *token_nodes]:
        mlp_add, embed = np.array(rep.mlp_add), np.array(rep.embed)
        if node < s:
            feature = graph.active_features[graph.selected_features[node]]
            mlp_add += np.asarray(_decoder_delta(rep, [(*feature, 0.0)], scale=False))
        elif node < s + n_layers * t:
            layer, pos = divmod(int(node - s), t)
            mlp_add[layer, pos] -= errors[layer, pos]
        else:
            embed[int(node - s - n_layers * t)] = 0.0
        change = _pre_activations(rep, graph, *rep.frozen_forward(mlp_add, embed)) - base
        edge = graph.adjacency_rows[:, node]
        np.testing.assert_allclose(-change, edge, rtol=1e-4, atol=2e-4 * np.abs(base).max())


def _peer_model_dir(hf_tiny, path: Path) -> Path:
    """The tiny model saved for circuit-tracer's transformers 4.57.3 (which reads RoPE from
    `rope_theta` / `rope_local_base_freq` / `rope_scaling`, not 5.x's `rope_parameters`) with
    a word-level tokenizer over its vocabulary (circuit-tracer decodes tokens with it)."""
    from tokenizers import Tokenizer, models

    hf_tiny.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    rope = config["rope_parameters"]
    full, local = rope["full_attention"], rope["sliding_attention"]
    config.update(
        rope_theta=full["rope_theta"],
        rope_local_base_freq=local["rope_theta"],
        rope_scaling={"rope_type": full["rope_type"], "factor": full["factor"]},
    )
    (path / "config.json").write_text(json.dumps(config, indent=1))
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0..3
    vocab = {name: i for i, name in enumerate(special)}
    vocab.update({f"t{i}": i for i in range(len(special), config["vocab_size"])})
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    names = ("pad_token", "eos_token", "bos_token", "unk_token")
    tok_config = dict(zip(names, special, strict=True))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


@pytest.fixture(scope="module")
def peer(plt_built, hf_tiny, tmp_path_factory):
    """circuit-tracer's graph of the same prompt, transcoders exported to its format; its
    frontend schema also parses our graph JSON."""
    if not (INTEROP_PYTHON.exists() and INTEROP_STAMP.exists()):
        pytest.fail(f"{INTEROP_STAMP} not found: run `make interop`", pytrace=False)
    rep, graph = plt_built
    root = tmp_path_factory.mktemp("ct_attribution")
    save_transcoder_set(rep.transcoders, root / "transcoders", "circuit-tracer")
    ours = write_graph_files(graph, root / "graphs", slug="tiny", png=False)["json"]
    argv = [_peer_model_dir(hf_tiny, root / "model"), root / "transcoders", root / "peer.npz"]
    argv += ["--tokens", ",".join(map(str, TOKENS)), "--batch-size", "64"]
    argv += ["--validate-graph-json", ours, "--token-scale", np.sqrt(rep.model.cfg.hidden_size)]
    proc = subprocess.run([str(INTEROP_PYTHON), str(PEER_SCRIPT), *map(str, argv)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"circuit-tracer failed:\n{proc.stdout}\n{proc.stderr[-4000:]}", pytrace=False)
    return dict(np.load(root / "peer.npz")), json.loads(ours.read_text())


def test_adjacency_matches_circuit_tracer(plt_built, peer):
    rep, graph = plt_built
    theirs, ours_json = peer
    np.testing.assert_array_equal(graph.active_features, theirs["active_features"])
    np.testing.assert_array_equal(graph.selected_features, theirs["selected_features"])
    np.testing.assert_allclose(graph.activation_values, theirs["activation_values"], atol=1e-5)
    np.testing.assert_array_equal(graph.logit_tokens, theirs["logit_tokens"])
    np.testing.assert_allclose(graph.logit_probabilities, theirs["logit_probabilities"], 1e-4)
    ours, peer_adjacency = graph.dense_adjacency(), theirs["adjacency"].copy()
    assert ours.shape == peer_adjacency.shape == (graph.n_nodes, graph.n_nodes)
    s, n_layers, t = graph.n_features, graph.n_layers, graph.n_pos
    tokens = np.arange(s + n_layers * t, s + (n_layers + 1) * t)
    scale = np.sqrt(rep.model.cfg.hidden_size)
    peer_adjacency[:, tokens] *= scale
    np.testing.assert_allclose(
        ours, peer_adjacency, rtol=1e-4, atol=1e-4 * np.abs(peer_adjacency).max()
    )
    assert np.abs(ours[:, tokens]).max() > 0.1 * np.abs(ours).max()  # token edges are tested
    assert int(theirs["validated_nodes"]) == len(ours_json["nodes"])


def test_max_feature_nodes_keeps_most_influential(plt_built):
    rep, full = plt_built
    small = attribute(rep, batch_size=32, max_feature_nodes=80, update_interval=1)
    assert small.n_features == 80
    assert small.adjacency_rows.shape == (80 + small.n_logits, small.n_nodes)
    k = full.n_logits
    first = partial_influence(full.adjacency_rows[-k:], full.logit_probabilities,
                              full.row_nodes[-k:])[: full.n_features]  # fmt: skip
    assert set(np.argsort(-first, kind="stable")[:32]) <= set(small.selected_features)
    features = list(small.selected_features)  # full graph: every active feature is a node
    row_index = features + list(range(full.n_features, full.n_features + full.n_logits))
    col_index = np.concatenate([features, np.arange(full.n_features, full.n_nodes)])
    expected = full.adjacency_rows[row_index][:, col_index]
    np.testing.assert_allclose(small.adjacency_rows, expected, atol=1e-5)


def test_rows_are_zero_outside_the_stored_reach(built):
    """The RowStore keeps a target's row only over features/errors of earlier layers at
    positions <= its own, and tokens up to it: every computed edge outside is exactly 0."""
    rep, graph = built
    feats = _ActiveFeatures.of(rep.codes)
    store = RowStore(feats.layer, feats.pos, rep.num_layers, len(rep.tokens))
    computer = _EdgeComputer(rep, feats, batch_size=8)
    idx = np.random.default_rng(0).choice(feats.layer.size, size=7, replace=False)
    vectors = jnp.concatenate(
        [rep.encoder_vectors(int(feats.layer[i]), feats.latent[i : i + 1]) for i in idx]
    )
    table = rep.model.embed_tokens[...].astype(jnp.float32)
    logit = table[graph.logit_tokens[:1]] - jnp.mean(table, axis=0)
    layers = np.append(feats.layer[idx], rep.num_layers)
    positions = np.append(feats.pos[idx], len(rep.tokens) - 1)
    rows = computer.rows(layers, positions, jnp.concatenate([vectors, logit]))
    for node, (layer, pos, row) in enumerate(zip(layers, positions, rows, strict=True)):
        assert store.append(node, layer, pos, row)
    every = np.arange(store.n_columns)
    np.testing.assert_array_equal(store.columns(np.arange(len(rows)), every), rows)
    assert store.nbytes < rows.nbytes


def test_row_budget_and_float16_rows(plt_built):
    rep, full = plt_built
    n_columns = full.n_nodes - full.n_logits
    budget = (full.n_logits + 20) * n_columns * 4
    with pytest.warns(UserWarning, match="memory budget"):
        small = attribute(rep, max_feature_nodes=200, update_interval=1,
                          row_dtype="float32", row_memory_gb=budget / 2**30)  # fmt: skip
    assert 20 <= small.n_features < 200
    features = list(small.selected_features)
    row_index = features + list(range(full.n_features, full.n_features + full.n_logits))
    col_index = np.concatenate([features, np.arange(full.n_features, full.n_nodes)])
    np.testing.assert_allclose(small.adjacency_rows, full.adjacency_rows[row_index][:, col_index],
                               atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="logit rows need"):
        attribute(rep, row_memory_gb=1e-9)
    with pytest.raises(ValueError, match="row_dtype"):
        attribute(rep, row_dtype="int8")

    half = attribute(rep, row_dtype="float16")
    np.testing.assert_array_equal(half.selected_features, full.selected_features)
    bound = np.abs(full.adjacency_rows).max(axis=1, keepdims=True) * 2.0**-11
    assert (np.abs(half.adjacency_rows - full.adjacency_rows) <= bound * 1.01).all()


def test_auto_batch_size():
    assert auto_batch_size(18, 64, 640) == 64
    assert auto_batch_size(18, 2048, 640) == 8  # 270M at 2048 tokens: ~3.8 GiB of buffers
    assert auto_batch_size(62, 32768, 5376) == 1


def test_intervene_frozen_matches_edge_prediction(plt_built):
    rep, graph = plt_built
    node = int(np.argmax(np.abs(graph.adjacency_rows[graph.n_features, : graph.n_features])))
    layer, pos, latent = graph.active_features[graph.selected_features[node]]
    value = float(graph.activation_values[graph.selected_features[node]])
    old = rep.logits[-1]
    new = intervene(rep, [(layer, pos, latent, 3.0)], how="frozen", scale=True)[-1]
    tok = graph.logit_tokens[0]
    predicted = graph.adjacency_rows[graph.n_features, node] / value * (3.0 * value - value)
    got = (new[tok] - new.mean()) - (old[tok] - old.mean())
    np.testing.assert_allclose(got, predicted, rtol=1e-3, atol=1e-4)
    moved = intervene(rep, [(layer, pos, latent, 0.0)], how="original")
    np.testing.assert_allclose(moved[:pos], rep.logits[:pos], atol=1e-4)  # the real model
    assert np.abs(moved[pos:] - rep.logits[pos:]).max() > 1e-3  # and the change propagates
    with pytest.raises(ValueError, match="out of range"):
        intervene(rep, [(99, 0, 0, 1.0)])


def test_pruning_and_graph_files(plt_built, tmp_path):
    _, graph = plt_built
    pruned = prune_graph(graph, 0.8, 0.98)
    k, t = graph.n_logits, graph.n_pos
    assert pruned.node_mask[-k:].all()
    kept = np.nonzero(pruned.node_mask[: -k - t])[0]
    dropped = np.nonzero(~pruned.node_mask[: -k - t])[0]
    assert dropped.size > 0
    cutoff = pruned.cumulative_scores[pruned.cumulative_scores >= 0.8].min()
    assert (pruned.cumulative_scores[kept] <= cutoff + 1e-6).all()

    paths = write_graph_files(graph, tmp_path, slug="tiny")
    doc = json.loads(paths["json"].read_text())
    assert list(doc) == ["metadata", "qParams", "nodes", "links"]
    assert all(list(node) == NODE_FIELDS for node in doc["nodes"])
    assert sum(n["feature_type"] == "logit" for n in doc["nodes"]) == k
    assert {n["feature_type"] for n in doc["nodes"]} <= {
        "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"
    }  # fmt: skip
    ids = {n["node_id"] for n in doc["nodes"]}
    assert doc["links"] and all(
        link["source"] in ids and link["target"] in ids for link in doc["links"]
    )
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = json.loads(paths["metadata"].read_text())
    assert [g["slug"] for g in index["graphs"]] == ["tiny"]


def test_transcoder_set_round_trips(tmp_path):
    tset = _plt(n_layers=3, d=16, width=8)
    for fmt in ("gemma-scope-2", "circuit-tracer"):
        save_transcoder_set(tset, tmp_path / fmt, fmt)
        back = load_transcoder_set(tmp_path / fmt)
        assert isinstance(back, TranscoderSet) and back.num_layers == 3
        for a, b in zip(tset, back, strict=True):
            for name, value in a.arrays().items():
                np.testing.assert_allclose(b.arrays()[name], value, atol=1e-6, err_msg=name)
    members = sorted(p for p in (tmp_path / "gemma-scope-2").iterdir() if p.is_dir())
    assert [p.name for p in members] == [f"layer_{i}_width_8_affine" for i in range(3)]
    assert load_transcoder_set(members).num_layers == 3
    shutil.rmtree(members[1])
    with pytest.raises(FormatError, match=r"missing layer\(s\) \[1\]"):
        load_transcoder_set(tmp_path / "gemma-scope-2")


def test_bad_transcoders_are_refused(tiny_model):
    with pytest.raises(ValueError, match="d_model is 64"):
        ReplacementModel.build(tiny_model, _plt(d=32), TOKENS)
    with pytest.raises(ValueError, match="cover 3 layers, the model has 7"):
        ReplacementModel.build(tiny_model, _plt(n_layers=3), TOKENS)
    with pytest.raises(ValueError, match="tokens must be ids"):
        ReplacementModel.build(tiny_model, _plt(), np.array([2, 100000]))


class _IdTokenizer:
    """Prompts of space-separated ids (the tiny model has no real tokenizer)."""

    def encode(self, text):
        return [2, *(int(x) for x in text.split())]

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_cli_attribute(plt_built, tiny_model, tmp_path, monkeypatch, capsys):
    import argparse

    from gemmascope_jax.cli import attribution as attribution_cli
    from gemmascope_jax.gemma3 import loading

    rep, graph = plt_built
    save_transcoder_set(rep.transcoders, tmp_path / "tc", "gemma-scope-2")
    monkeypatch.setattr(loading, "load_gemma3", lambda *a, **k: (tiny_model, _IdTokenizer()))
    parser = argparse.ArgumentParser(prog="gemmascope-jax")
    attribution_cli.add_attribute_parser(parser.add_subparsers(dest="command", required=True))
    prompt = " ".join(str(t) for t in TOKENS[1:])
    argv = ["attribute", prompt, "--transcoders", str(tmp_path / "tc"), "--out",
            str(tmp_path / "out"), "--slug", "cli", "--row-dtype", "float16"]  # fmt: skip
    args = parser.parse_args(argv)
    assert run_verb("attribute", args.func, args) == 0
    doc = json.loads((tmp_path / "out" / "cli.json").read_text())
    assert doc["metadata"]["prompt_tokens"][1] == f"t{TOKENS[1]}"
    assert sum(n["feature_type"] == "logit" for n in doc["nodes"]) == graph.n_logits
    assert (tmp_path / "out" / "cli.png").exists()
    args = parser.parse_args([*argv, "--row-memory-gb", "1e-9"])
    assert run_verb("attribute", args.func, args) == 2
    assert "logit rows need" in capsys.readouterr().err


# ---- replacement and completeness scores (circuit-tracer's compute_graph_scores) -------------


def _hand_graph(feature_row, logit_row, n_layers=1):
    """One token, one feature, n_layers error nodes, one logit (p = 1); rows over the nodes
    [feature, errors..., token, logit]."""
    rows = np.array([feature_row, logit_row], np.float32)
    return AttributionGraph(
        tokens=np.array([2]), token_strings=["<bos>"], prompt="", n_layers=n_layers,
        active_features=np.array([[0, 0, 0]]), activation_values=np.ones(1, np.float32),
        selected_features=np.array([0]), adjacency_rows=rows, logit_tokens=np.array([7]),
        logit_probabilities=np.ones(1, np.float32),
    )  # fmt: skip


def test_graph_scores_hand_built():
    #         feature error token logit
    through_features = _hand_graph([0, 0, 1.0, 0], [2.0, 0, 0, 0])
    assert graph_scores(through_features) == pytest.approx((1.0, 1.0))
    # the logit reads only the error node: the token reaches it through no feature
    through_errors = _hand_graph([0, 0, 1.0, 0], [0, 1.0, 0, 0])
    replacement, completeness = graph_scores(through_errors)
    assert replacement == 0.0
    # I + w: error 1, logit 1 (feature and token 0); non-error shares error 1, logit 0
    assert completeness == pytest.approx(0.5)
    # mixed: feature row |.| normalised (token 3/4, error 1/4), logit row (1/4, 1/4, 1/2)
    mixed = _hand_graph([0, -1.0, 3.0, 0], [1.0, 1.0, 2.0, 0])
    # I: feature 1/4, error 1/4 + 1/4 * 1/4 = 5/16, token 1/2 + 1/4 * 3/4 = 11/16
    # completeness: (3/4 * 1/4 + 5/16 + 11/16 + 3/4 * 1) / (1/4 + 5/16 + 11/16 + 1)
    assert graph_scores(mixed) == pytest.approx((11 / 16, 1.9375 / 2.25))
    # a pure sign flip changes nothing (|A| is normalised)
    flipped = _hand_graph([0, 1.0, -3.0, 0], [-1.0, 1.0, -2.0, 0])
    assert graph_scores(flipped) == pytest.approx(graph_scores(mixed))


def test_graph_scores_pruned_hand_built():
    mixed = _hand_graph([0, -1.0, 3.0, 0], [1.0, 1.0, 2.0, 0])
    every_node, every_edge = np.ones(4, bool), np.ones((2, 4), bool)
    assert graph_scores(mixed, every_node, every_edge) == pytest.approx(graph_scores(mixed))
    # drop the error -> logit edge: logit row (1/3, 0, 2/3); I: feature 1/3, error 1/12,
    # token 2/3 + 1/4 = 11/12; completeness (3/4 * 1/3 + 1/12 + 11/12 + 1) / (7/3) = 27/28
    edge_mask = every_edge.copy()
    edge_mask[1, 1] = False
    assert graph_scores(mixed, edge_mask=edge_mask) == pytest.approx((11 / 12, 27 / 28))
    dense = np.ones((4, 4), bool)  # circuit-tracer's [n, n] mask, same edge dropped
    dense[3, 1] = False
    assert graph_scores(mixed, edge_mask=dense) == pytest.approx((11 / 12, 27 / 28))
    # drop the error node: nothing reaches the logits through errors any more
    node_mask = np.array([True, False, True, True])
    assert graph_scores(mixed, node_mask) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="node_mask must have shape"):
        graph_scores(mixed, np.ones(3, bool))
    with pytest.raises(ValueError, match="edge_mask must have shape"):
        graph_scores(mixed, edge_mask=np.ones((3, 4), bool))


def _dense_scores(graph, keep=None):
    """compute_graph_scores written out on the dense matrix with (I - Â)^-1 - I."""
    a = np.abs(graph.dense_adjacency().astype(np.float64))
    if keep is not None:
        a *= keep
    norm = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-10)
    n, s, t = graph.n_nodes, graph.n_features, graph.n_pos
    w = np.zeros(n)
    w[-graph.n_logits :] = graph.logit_probabilities
    influence = w @ (np.linalg.inv(np.eye(n) - norm) - np.eye(n))
    errors, tokens = (
        slice(s, s + graph.n_layers * t),
        slice(s + graph.n_layers * t, n - graph.n_logits),
    )
    replacement = influence[tokens].sum() / (influence[tokens].sum() + influence[errors].sum())
    out = influence + w
    completeness = ((1 - norm[:, errors].sum(axis=1)) * out).sum() / out.sum()
    return replacement, completeness


def test_graph_scores_match_dense_formula(built):
    _, graph = built
    ours = graph_scores(graph)
    np.testing.assert_allclose(ours, _dense_scores(graph), rtol=1e-5)
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0  # random transcoders: errors matter
    pruned = prune_graph(graph, 0.8, 0.98)
    assert not pruned.node_mask.all()
    keep = np.zeros((graph.n_nodes, graph.n_nodes), bool)
    keep[graph.row_nodes] = pruned.edge_mask
    keep &= pruned.node_mask[:, None] & pruned.node_mask[None, :]
    pruned_scores = graph_scores(graph, pruned.node_mask, pruned.edge_mask)
    np.testing.assert_allclose(pruned_scores, _dense_scores(graph, keep), rtol=1e-5)
    assert pruned_scores != pytest.approx(ours)
    # a pruned graph with every node and edge is the graph itself
    every = np.ones(graph.adjacency_rows.shape, bool)
    assert graph_scores(graph, np.ones(graph.n_nodes, bool), every) == pytest.approx(ours)


def _peer_graph(theirs) -> AttributionGraph:
    """circuit-tracer's graph (peer.npz) as our AttributionGraph."""
    n_features = len(theirs["selected_features"])
    graph = AttributionGraph(
        tokens=theirs["input_tokens"], token_strings=[""] * len(theirs["input_tokens"]),
        prompt="", n_layers=int(theirs["n_layers"]), active_features=theirs["active_features"],
        activation_values=theirs["activation_values"],
        selected_features=theirs["selected_features"], adjacency_rows=np.zeros((0, 0)),
        logit_tokens=theirs["logit_tokens"], logit_probabilities=theirs["logit_probabilities"],
    )  # fmt: skip
    rows = np.concatenate([np.arange(n_features), np.arange(graph.n_nodes - graph.n_logits,
                                                            graph.n_nodes)])  # fmt: skip
    graph.adjacency_rows = theirs["adjacency"][rows]
    return graph


def test_graph_scores_match_circuit_tracer(plt_built, peer):
    """Our graph_scores equals circuit-tracer's compute_graph_scores, unpruned and pruned
    (its prune_graph masks applied to the adjacency), on circuit-tracer's own graph; and on
    our graph, against circuit-tracer's graph with its token edges in our convention."""
    _, graph = plt_built
    theirs, _ = peer
    same = _peer_graph(theirs)
    np.testing.assert_allclose(graph_scores(same), theirs["scores"], rtol=1e-5)
    masks = theirs["prune_node_mask"], theirs["prune_edge_mask"]
    np.testing.assert_allclose(graph_scores(same, *masks), theirs["pruned_scores"], rtol=1e-5)
    pruned = prune_graph(same, 0.8, 0.98)  # our pruning of their graph: the same masks
    np.testing.assert_array_equal(pruned.node_mask, theirs["prune_node_mask"])
    np.testing.assert_array_equal(pruned.edge_mask, theirs["prune_edge_mask"][same.row_nodes])
    assert not pruned.node_mask.all()

    # our attribution graph (token edges x sqrt(d_model)) vs theirs rescaled the same way
    np.testing.assert_allclose(graph_scores(graph), theirs["scaled_scores"], rtol=1e-5)
    ours_pruned = prune_graph(graph, 0.8, 0.98)
    np.testing.assert_array_equal(ours_pruned.node_mask, theirs["scaled_prune_node_mask"])
    np.testing.assert_allclose(graph_scores(graph, ours_pruned.node_mask, ours_pruned.edge_mask),
                               theirs["scaled_pruned_scores"], rtol=1e-5)  # fmt: skip


class _WordTokenizer:
    """Maps each word of a prompt to an id in the tiny vocabulary (BOS first)."""

    def encode(self, text):
        return [2, *(4 + sum(map(ord, word)) % 500 for word in text.split())]

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_graph_quality(tiny_model, kind):
    transcoders = _plt() if kind == "plt" else _clt()
    tok = _WordTokenizer()
    prompts = ["the cat sat on the", "one two three four five six"]
    report = graph_quality(tiny_model, tok, transcoders, prompts, batch_size=32)
    assert json.loads(json.dumps(report)) == report
    assert report["n_prompts"] == 2 and [p["prompt"] for p in report["per_prompt"]] == prompts
    for entry, prompt in zip(report["per_prompt"], prompts, strict=True):
        rep = ReplacementModel.build(tiny_model, transcoders, tok.encode(prompt))
        graph = attribute(rep, batch_size=32, max_feature_nodes=7500)
        pruned = prune_graph(graph)
        assert entry["n_tokens"] == graph.n_pos and entry["n_features"] == graph.n_features
        assert entry["n_pruned_nodes"] == int(pruned.node_mask.sum()) < graph.n_nodes
        expected = graph_scores(graph), graph_scores(graph, pruned.node_mask, pruned.edge_mask)
        for which, scores in zip(("unpruned", "pruned"), expected, strict=True):
            got = entry[which]["replacement"], entry[which]["completeness"]
            np.testing.assert_allclose(got, scores, rtol=1e-6)
    for which in ("unpruned", "pruned"):
        for name in ("replacement", "completeness"):
            values = [p[which][name] for p in report["per_prompt"]]
            assert report[which][name]["mean"] == pytest.approx(np.mean(values))
            assert report[which][name]["min"] == pytest.approx(min(values))
            assert all(0.0 <= v <= 1.0 for v in values)
    with pytest.raises(ValueError, match="at least one prompt"):
        graph_quality(tiny_model, tok, transcoders, [])
