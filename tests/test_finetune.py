"""End-to-end KL finetuning (training.finetune, TR §2.4): the loss is the report's formula,
the KL term's gradient matches finite differences, the language model is frozen, and a YAML
run lowers the spliced KL, matches itself on 8 simulated devices and resumes exactly after
SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from gemmascope_jax.dictionaries.config import DictionaryConfig
from gemmascope_jax.evals.splice import splice_batch
from gemmascope_jax.formats import load_dictionary
from gemmascope_jax.sharding import make_mesh
from gemmascope_jax.training.config import load_config
from gemmascope_jax.training.finetune import run_finetune
from gemmascope_jax.training.finetune_step import FinetuneStep
from gemmascope_jax.training.losses import LossConfig
from gemmascope_jax.training.optimizer import OptimizerConfig
from gemmascope_jax.training.step import DictionaryTraining
from gemmascope_jax.training.trainer import run_training
from tests.hf_reference import tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
BETA = 2.0


def _cfgs():
    common = dict(d_in=64, d_out=64, architecture="jumprelu", l0_target=6.0)
    return [
        DictionaryConfig(kind="sae", width=32, layers=(3,), **common),
        DictionaryConfig(kind="transcoder", width=32, layers=(2,), **common),
        DictionaryConfig(kind="skip_transcoder", width=32, layers=(4,), **common),
        DictionaryConfig(kind="clt", width=16, layers=(1, 2, 3), **common),
    ]


@pytest.fixture(scope="module")
def ft(hf_tiny_dir):
    """In float64 (the model; dictionary parameters stay float32, computed in float64): a
    FinetuneStep of an SAE, a transcoder, a skip-transcoder and a 3-layer CLT on the tiny
    model, its initial state (b_dec at the data mean), tokens with <bos> first, the clean
    sites, and one jitted `value_and_grad` of the summed KL terms (metrics as aux)."""
    from gemmascope_jax.gemma3.loading import load_gemma3

    jax.config.update("jax_enable_x64", True)
    try:
        model, _ = load_gemma3(hf_tiny_dir, dtype=jnp.float64, tokenizer=False, progress=False)
        trainings = [
            DictionaryTraining(c, LossConfig(sparsity_coeff=0.1, sparsity_warmup_steps=0))
            for c in _cfgs()
        ]
        tokens = np.random.RandomState(0).randint(4, 512, size=(2, 16)).astype(np.int32)
        tokens[:, 0] = 2
        sites = sorted({s for t in trainings for s in (*t.cfg.input_sites, *t.cfg.output_sites)})
        clean = {k: np.asarray(v) for k, v in model(tokens, capture=sites).sites.items()}
        scalars = {s: float(np.sqrt(np.mean(np.sum(clean[s] ** 2, -1)))) for s in sites}
        step = FinetuneStep(trainings, make_mesh(1, 1), model, scalars, beta=BETA)
        mean_batch = {s: clean[s][:, 1:].reshape(-1, 64) / scalars[s] for s in sites}
        state = step.init(seed=0, mean_batch=mean_batch)

        def kl_sum(params):
            total, metrics, parts = step.losses(params, tokens, step.lm_params, jnp.int32(0), True)
            return sum(kl for _, kl in parts), (total, metrics, parts)

        f = jax.jit(jax.value_and_grad(kl_sum, has_aux=True))
        yield step, state, tokens, clean, f
    finally:
        jax.config.update("jax_enable_x64", False)


def _model(step):
    from flax import nnx

    return nnx.merge(step.graphdef, step.lm_params)


def test_loss_is_the_reports_formula(ft):
    step, state, tokens, clean, f = ft
    (_, (total, metrics, parts)), _ = f(state.params)
    spliced = (tokens != 2).reshape(-1)
    for t, d, m in zip(step.trainings, step.dictionaries(state), metrics, strict=True):
        s_in, s_out = step._scales(t)
        # MSE by hand on the clean run's activations (normalised units, <bos> excluded)
        x = np.stack([clean[s] for s in t.cfg.input_sites], -2).reshape(32, -1, 64)
        y = np.stack([clean[s] for s in t.cfg.output_sites], -2).reshape(32, -1, 64)
        s_in, s_out = np.reshape(s_in, (-1, 1)), np.reshape(s_out, (-1, 1))
        xin = x / s_in if t.cfg.multilayer else x[:, 0] / s_in[0]
        y_hat = np.asarray(d(jnp.asarray(xin)))
        y_hat = y_hat if t.cfg.multilayer else y_hat[:, None]
        mse = np.mean(np.sum((y / s_out - y_hat) ** 2, axis=(1, 2))[spliced])
        np.testing.assert_allclose(m["mse"], mse, rtol=1e-5)
        # KL: the splice eval's (an independent implementation of p(x̂); CLT causal)
        multi = t.cfg.multilayer
        scales = (s_in[:, 0], s_out[:, 0]) if multi else (s_in[0, 0], s_out[0, 0])
        sums = splice_batch(_model(step), d, tokens, None, *scales)
        np.testing.assert_allclose(m["kl"], sums["kl"] / sums["count"], rtol=1e-5)
        # L = (MSE + α·β·KL) / (1 + β) + sparsity, α = MSE / (KL + 1e-8)
        mse_f, kl_f = float(m["mse"]), float(m["kl"])
        alpha = mse_f / (kl_f + 1e-8)
        np.testing.assert_allclose(m["alpha"], alpha, rtol=1e-6)
        e2e = (mse_f + alpha * BETA * kl_f) / (1 + BETA)
        np.testing.assert_allclose(m["e2e_loss"], e2e, rtol=1e-6)
        codes = np.asarray(d.encode(jnp.asarray(xin)))
        l0 = np.sum(codes > 0, axis=tuple(range(1, codes.ndim)))
        sparsity = 0.1 * (2 / 6.0) * (np.mean(l0[spliced]) - 6.0) ** 2
        np.testing.assert_allclose(m["sparsity_loss"], sparsity, rtol=1e-5)
        np.testing.assert_allclose(m["loss"], e2e + sparsity, rtol=1e-6)
        assert kl_f > 1e-3  # a real splice, not a no-op
    np.testing.assert_allclose(total, sum(float(m["loss"]) for m in metrics), rtol=1e-6)
    for (mse, kl), m in zip(parts, metrics, strict=True):
        assert float(mse) == float(m["mse"]) and float(kl) == float(m["kl"])


def test_kl_gradient_matches_finite_differences(ft):
    """d KL / d(dictionary params) from jax.grad vs central differences (float64 model) along
    a random direction of each parameter, for all four kinds. θ = 0 here, so the codes are
    continuous in the parameters (at θ > 0 a code jumps, where the STE takes over: θ's own
    gradient is the straight-through estimator's by design and is not checked). The
    dictionaries are independent, so one perturbed call moves parameter `name` of each."""
    step, state, tokens, _, f = ft
    params0 = tuple({**p, "threshold": jnp.zeros_like(p["threshold"])} for p in state.params)
    _, grads = f(params0)
    rng = np.random.RandomState(1)
    checked = 0
    names = dict.fromkeys(n for p in params0 for n in p if n != "threshold")
    for name in names:
        owners = [i for i, p in enumerate(params0) if name in p]
        ends, an = {}, {}
        for i in owners:
            p = np.asarray(params0[i][name])
            v = rng.normal(size=p.shape)
            v *= 1e-5 * max(float(np.linalg.norm(p)), 1.0) / np.linalg.norm(v)
            ends[i] = (p + v).astype(np.float32), (p - v).astype(np.float32)
            half = (ends[i][0].astype(np.float64) - ends[i][1].astype(np.float64)) / 2
            an[i] = float(np.vdot(np.asarray(grads[i][name], np.float64), half))

        def kls(side, name=name, ends=ends):
            params = list(params0)
            for i, pair in ends.items():
                q = jax.device_put(pair[side], params0[i][name].sharding)
                params[i] = {**params[i], name: q}
            parts = f(tuple(params))[0][1][2]
            return [float(kl) for _, kl in parts]

        plus, minus = kls(0), kls(1)
        for i in owners:
            fd = (plus[i] - minus[i]) / 2  # along the float32-representable step
            label = step.trainings[i].label
            assert abs(an[i]) > 1e-9, (label, name, an[i])
            assert abs(fd - an[i]) <= 2e-3 * abs(an[i]) + 1e-12, (label, name, fd, an[i])
            checked += 1
    # every parameter but θ of each kind (b_pre: the transcoders' and CLT's free pre-bias;
    # the SAE's is tied to b_dec), the CLT's three decoder blocks one by one
    assert checked == 4 + 5 + 6 + 7


@pytest.fixture(scope="module")
def sae_step(ft):
    """An SAE-only FinetuneStep (small compile) and its state, from `ft`'s SAE."""
    big, state, _, _, _ = ft
    training = dataclasses.replace(
        big.trainings[0], optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0)
    )
    step = FinetuneStep([training], big.mesh, _model(big), big.scalars, beta=8.0, donate=False)
    return step, step.init(dictionaries=[big.trainings[0].module(state.params[0])])


def test_language_model_is_frozen(ft, sae_step):
    """No gradient reaches the language model, and a step leaves its parameters alone."""
    _, _, tokens, _, _ = ft
    step, state = sae_step
    before = jax.tree.map(np.asarray, step.lm_params)

    def loss_of_lm(lm):
        return step.losses(state.params, tokens, lm, jnp.int32(0))[0]

    g = jax.jit(jax.grad(loss_of_lm))(step.lm_params)
    assert all(not np.asarray(a).any() for a in jax.tree.leaves(g))
    new, metrics = step(state, {"tokens": tokens})
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, step.lm_params))
    assert int(new.step) == 1 and np.isfinite(float(metrics[step.names[0]]["loss"]))
    assert not np.array_equal(new.params[0]["w_dec"], state.params[0]["w_dec"])


def test_loss_mask_restricts_the_spliced_tokens(ft, sae_step):
    """A `loss_mask` (a source's `loss_tokens`, e.g. chat responses) restricts the spliced
    tokens: all-true is the unmasked loss; a mask of the second half gives the MSE of those
    tokens by hand, and a different, positive KL (only they are spliced)."""
    _, _, tokens, clean, _ = ft
    step, state = sae_step
    run = jax.jit(
        lambda m: step.losses(state.params, tokens, step.lm_params, jnp.int32(0), loss_mask=m)[1]
    )
    full = run(np.ones(tokens.shape, bool))[0]
    plain = step.losses(state.params, tokens, step.lm_params, jnp.int32(0))[1][0]
    for k in ("mse", "kl", "loss"):
        np.testing.assert_allclose(full[k], plain[k], rtol=1e-6)
    half = np.zeros(tokens.shape, bool)
    half[:, 8:] = True
    m = run(half)[0]
    site = step.trainings[0].cfg.input_sites[0]
    x = clean[site][:, 8:].reshape(-1, 64) / step.scalars[site]
    y_hat = np.asarray(step.dictionaries(state)[0](jnp.asarray(x)))
    np.testing.assert_allclose(m["mse"], np.mean(np.sum((x - y_hat) ** 2, -1)), rtol=1e-5)
    assert float(m["kl"]) > 0 and not np.isclose(float(m["kl"]), float(full["kl"]))


def test_finetune_lowers_spliced_kl_on_heldout_tokens(sae_step):
    """24 finetune steps (β = 8) on random token batches lower the spliced KL on other,
    held-out tokens (splice eval) well below the starting SAE's (by > 30 %; 0.97 -> 0.60),
    and below the same steps with β = 0, MSE and sparsity only (0.62). The delta LM loss of
    this random model on random tokens is negative (the splice makes the predictions
    flatter), so it is not asserted."""
    step, state0 = sae_step
    mse_only = FinetuneStep(
        step.trainings, step.mesh, _model(step), step.scalars, beta=0.0, donate=False
    )
    heldout = _random_tokens(np.random.RandomState(5), 8)
    s = step.scalars[step.trainings[0].cfg.input_sites[0]]

    def splice(st):
        sums = splice_batch(_model(step), st_dict(st), heldout, None, s, s)
        return float(sums["kl"] / sums["count"]), float(
            (sums["ce_spliced"] - sums["ce_clean"]) / sums["count"]
        )

    def st_dict(st):
        return step.dictionaries(st)[0]

    def train(fs):
        rng, state = np.random.RandomState(6), state0
        for _ in range(24):
            state, _ = fs(state, {"tokens": _random_tokens(rng, 2)})
        return splice(state)

    (kl0, dl0), (kl1, dl1), (kl_mse, _) = splice(state0), train(step), train(mse_only)
    assert kl1 < 0.7 * kl0, (kl0, kl1, dl0, dl1, kl_mse)
    assert kl1 < 0.98 * kl_mse, (kl0, kl1, kl_mse)


def _random_tokens(rng, n: int) -> np.ndarray:
    tokens = rng.randint(4, 512, size=(n, 16)).astype(np.int32)
    tokens[:, 0] = 2
    return tokens


# ---- from YAML: 1 device, 8 devices, SIGKILL ---------------------------------------------------


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, gguf_path):
    """A tiny full-vocabulary Gemma 3 with the real tokenizer and a short first stage (SAE and
    skip-transcoder) trained on it."""
    from gemmascope_jax.gemma3.tokenizer import load_tokenizer_from_gguf

    root = tmp_path_factory.mktemp("finetune")
    model_dir = root / "model"
    tiny_causal_lm(seed=1, vocab_size=262_144).save_pretrained(model_dir)
    load_tokenizer_from_gguf(gguf_path).save(model_dir)
    path = write_config(root, model_dir, root / "stage1")
    with jax.enable_x64(False):
        run_training(load_config(path))
    return model_dir, root / "stage1"


def write_config(root: Path, model_dir: Path, run_dir: Path, **finetune) -> Path:
    cfg = {
        "run": {"name": "tiny", "dir": str(run_dir)},
        "model": {"source": str(model_dir)},
        "data": {
            "sources": [{"type": "embedded"}],
            "seq_len": 16,
            "batch_size": 2,
            "shuffle_buffer_tokens": 256,
            "norm_tokens": 128,
        },
        "dictionary_defaults": {"width": 32, "l0_target": 6},
        "dictionaries": [
            {"name": "sae", "kind": "sae", "input_sites": "resid_post.3"},
            {"name": "skip", "kind": "skip_transcoder", "layers": [3]},
        ],
        "train": {
            "steps": 30,
            "batch_tokens": 64,
            "lr": 3e-3,
            "lr_warmup_steps": 2,
            "sparsity_warmup_steps": 10,
            "init_b_dec_mean": True,
        },
        "finetune": {"beta": 4.0, "steps": 8, "lr": 1e-3, "batch_size": 2, **finetune},
        "checkpoint": {"every_steps": 2, "keep": 2},
        "eval": {"every_steps": 0, "heldout_tokens": 128, "card": False},
        "export": {"formats": ["native"]},
        "report": {"log_every": 2, "progress": False},
    }
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _params(run_dir: Path, name: str) -> dict[str, np.ndarray]:
    d = load_dictionary(run_dir / "finetune" / "export" / name / "native")
    return {k: np.asarray(v) for k, v in d.arrays().items()}


def _cli(config: Path, devices: int, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen(
        [sys.executable, "-m", "gemmascope_jax.cli", "finetune", str(config), *overrides],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_finetune_from_yaml_lowers_kl_and_matches_on_8_devices_and_after_sigkill(stage1, tmp_path):
    model_dir, first = stage1
    init = f"finetune.init_from={first}"
    cfg = {n: write_config(tmp_path, model_dir, tmp_path / n) for n in ("one", "eight", "kill")}
    eight = _cli(cfg["eight"], 8, init, "mesh.data=2", "mesh.model=4")
    killed = _cli(cfg["kill"], 1, init)
    ckpts = tmp_path / "kill" / "finetune" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        if (ckpts / "2" / "commit_success.txt").exists():
            break
        time.sleep(0.01)
    assert killed.poll() is None, "finetune finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "kill" / "finetune" / "export").exists()
    resumed = _cli(cfg["kill"], 1, init)
    with jax.enable_x64(False):  # as in the subprocesses (the unit tests' fixture sets it)
        result = run_finetune(load_config(cfg["one"], [init]))

    # the finetune lowers the spliced KL (held-out text) from the first stage's dictionaries
    # (the strong check is the unit test above; on these random models the delta LM loss is
    # negative, so it is no measure of faithfulness here)
    for name in ("sae", "skip"):
        before, after = result.before[name], result.after[name]
        assert after["kl"] < before["kl"], (name, before, after)
    summary = json.loads((tmp_path / "one" / "finetune" / "report" / "summary.json").read_text())
    assert summary["after"]["sae"]["kl"] == pytest.approx(result.after["sae"]["kl"])

    for proc in (eight, resumed):
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
    for name in ("sae", "skip"):
        a = _params(tmp_path / "one", name)
        b, c = _params(tmp_path / "kill", name), _params(tmp_path / "eight", name)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"resume {name}.{k}")
            # 8 devices sum gradients in another order; Adam divides each entry by its own
            # RMS, so an entry whose gradient is ~0 moves by a rounding-dependent fraction of
            # lr (1e-3) per step: 1e-5 absolute over 8 steps, not 1e-6 (seen: 4.6e-6, 9.4e-6)
            np.testing.assert_allclose(a[k], c[k], rtol=1e-5, atol=1e-5, err_msg=f"8 {name}.{k}")


def test_finetune_starts_from_an_export_folder_like_from_the_checkpoint(stage1):
    """`finetune.init_from` an export folder (`<name>/native` per dictionary) instead of a
    run directory: the exports, unfolded with scalars estimated on the run's data, are the
    checkpoint's dictionaries (the same scalars, the same functions of the activations)."""
    from gemmascope_jax.data.pipeline import norm_scalars_of, split_run_documents
    from gemmascope_jax.gemma3.loading import load_gemma3
    from gemmascope_jax.training.config import dictionary_trainings
    from gemmascope_jax.training.finetune import _first_stage
    from gemmascope_jax.training.step import TrainStep

    model_dir, first = stage1
    with jax.enable_x64(False):
        model, tok = load_gemma3(model_dir, progress=False)
        cfg = load_config(first / "config.yaml", [f"finetune.init_from={first}"])
        step = TrainStep(dictionary_trainings(cfg, model), make_mesh(1, 1), donate=False)
        train_docs = split_run_documents(cfg)[0]

        def estimate():
            return norm_scalars_of(cfg, model, tok, step.sites, train_docs)

        ckpt_dicts, ckpt_scalars, where = _first_stage(cfg, step, estimate)
        assert where.startswith("checkpoint")
        exp_cfg = load_config(first / "config.yaml", [f"finetune.init_from={first / 'export'}"])
        exp_dicts, exp_scalars, where = _first_stage(exp_cfg, step, estimate)
        assert where.startswith("exports")
        assert exp_scalars == ckpt_scalars  # estimated exactly as the first stage did
        x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
        for name, a, b in zip(step.names, ckpt_dicts, exp_dicts, strict=True):
            pre = a.pre_activations(x)  # the pre-encoder bias of the export is in b_enc
            np.testing.assert_allclose(b.pre_activations(x), pre, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(b.threshold[...], a.threshold[...], rtol=1e-5)
            codes = a.activate(pre)
            np.testing.assert_allclose(
                b.decode(codes, x), a.decode(codes, x), rtol=1e-4, atol=1e-5, err_msg=name
            )
        with pytest.raises(FileNotFoundError, match="no export of"):
            bad = load_config(first / "config.yaml", [f"finetune.init_from={model_dir}"])
            _first_stage(bad, step, estimate)
