"""`gemmascope-jax plan`: AOT compiles for real TPU topologies through libtpu (no TPU needed).

Each compile runs once per module (fixtures): a tiny-model variant of the 270m resid_post
recipe on one v5e and one v5p slice (seconds each), and the shipped 270m 16k recipe itself on
v5p with a small token batch (about 40 s on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from gemmascope_jax import cli
from gemmascope_jax.sharding import LOGICAL_RULES, lm_rules, logical_to_spec, make_mesh

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "gs2"
JSON_KEYS = (
    "topology",
    "devices",
    "mesh",
    "per_device_bytes",
    "hbm_bytes",
    "fits",
    "flops_per_step",
    "bytes_per_step",
    "est_step_s",
    "est_tokens_per_s_per_chip",
)
# The shipped recipe with a small token batch: ~40 s of XLA:TPU compile on 2 CPU cores.
SMALL_BATCH = ["data.batch_size=4", "data.seq_len=128"]
# Width 2^26 on the tiny model: 65 GiB of SAE state on one v5e chip (16 GiB).
TOO_WIDE = ["dictionaries.0.width=67108864", "dictionaries.0.matryoshka=false"]


def run_plan(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gemmascope-jax plan ...`, in process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["plan", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    """The 270m 16k resid_post recipe on the tiny preset (7 layers, d 64), one SAE."""
    path = tmp_path_factory.mktemp("plan") / "tiny.yaml"
    path.write_text(
        f"extends: {RECIPES / 'resid_post_270m_16k.yaml'}\n"
        "model: {preset: tiny, dtype: bfloat16}\n"
        "data: {seq_len: 64, batch_size: 8}\n"
        "dictionaries:\n"
        "  - {name: sae_3, layers: 3, width: 1024, l0_target: 20}\n"
        "  - {name: tc_5, kind: transcoder, input_sites: mlp_in.5, output_sites: mlp_out.5,"
        " width: 2048, l0_target: 20}\n"
    )
    return path


def _json_plan(*argv: str) -> tuple[int, dict, str]:
    rc, out, err = run_plan(*argv, "--json")
    return rc, json.loads(out.strip().splitlines()[-1]), out


@pytest.fixture(scope="module")
def v5e_plan(tiny_recipe):
    return _json_plan(str(tiny_recipe), "--topology", "v5e:2x2", "mesh.model=2")


@pytest.fixture(scope="module")
def v5p_plan(tiny_recipe):
    return _json_plan(str(tiny_recipe), "--topology", "v5p:2x2x1")


@pytest.fixture(scope="module")
def recipe_plan():
    recipe = RECIPES / "resid_post_270m_16k.yaml"
    return _json_plan(str(recipe), "--topology", "v5p:2x2x1", *SMALL_BATCH)


def _check_consistent(plan: dict, topology: str, devices: int):
    assert all(key in plan for key in JSON_KEYS)
    assert plan["topology"] == topology
    assert plan["devices"] == devices == plan["mesh"]["data"] * plan["mesh"]["model"]
    pd = plan["per_device_bytes"]
    parts = pd["arguments"] + pd["temp"] + pd["output"] + pd["generated_code"] - pd["alias"]
    assert pd["total"] == parts > 0
    assert plan["usable_hbm_bytes"] == plan["hbm_bytes"] * 63 // 64  # XLA's share, stated
    assert plan["fits"] == (pd["total"] <= plan["usable_hbm_bytes"])
    # XLA's figure adds the norm scalars and TPU layout padding of small arrays
    assert 0 < sum(plan["argument_breakdown"].values()) <= pd["arguments"]
    assert plan["flops_per_step"] > 0 and plan["bytes_per_step"] > 0
    tokens_per_s = plan["tokens_per_step"] / plan["est_step_s"] / plan["devices"]
    assert plan["est_tokens_per_s_per_chip"] == pytest.approx(tokens_per_s)


def test_plan_v5e_json(v5e_plan):
    rc, plan, out = v5e_plan
    assert rc == 0 and plan["fits"]
    _check_consistent(plan, "v5e:2x2", 4)
    assert plan["mesh"] == {"data": 2, "model": 2}
    assert plan["hbm_bytes"] == 16 * 1024**3
    assert "per-device memory" in out and "roofline" in out


def test_plan_v5p_json(v5p_plan):
    rc, plan, _ = v5p_plan
    assert rc == 0 and plan["fits"]
    _check_consistent(plan, "v5p:2x2x1", 4)
    assert plan["hbm_bytes"] == 95 * 1024**3
    assert plan["tokens_per_step"] == 8 * 63


def test_plan_shipped_recipe(recipe_plan):
    rc, plan, _ = recipe_plan
    assert rc == 0 and plan["fits"]
    _check_consistent(plan, "v5p:2x2x1", 4)
    names = [k for k in plan["argument_breakdown"] if k.startswith("dictionary ")]
    assert len(names) == 4
    counted = sum(plan["argument_breakdown"].values())
    assert counted == pytest.approx(plan["per_device_bytes"]["arguments"], rel=0.02)


def test_plan_does_not_fit(tiny_recipe):
    rc, out, err = run_plan(str(tiny_recipe), "--topology", "v5e:2x2", *TOO_WIDE, "--json")
    plan = json.loads(out.strip().splitlines()[-1])
    assert rc == 1 and not plan["fits"]
    assert "does not fit" in err and "dictionary state" in err and "sae_3" in err
    assert "dictionary state" in plan["dominant"] and "w_dec" in plan["dominant"]


@pytest.mark.parametrize("topology", ["v9x:2x2", "v5e:3x3", "v5e"])
def test_plan_bad_topology(tiny_recipe, topology):
    rc, out, err = run_plan(str(tiny_recipe), "--topology", topology)
    assert rc == 2 and err.startswith("gemmascope-jax plan: error:") and not out


def test_plan_bad_config(tiny_recipe):
    rc, _, err = run_plan(str(tiny_recipe), "--topology", "v5e:2x2", "mesh.model=3")
    assert rc == 2 and "error:" in err and "mesh" in err


def test_lm_rules_fsdp_is_opt_in():
    import jax

    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    assert lm_rules() is LOGICAL_RULES
    rules = lm_rules(fsdp=True)
    assert rules["embed"] == "data" and LOGICAL_RULES["embed"] is None
    assert {k: v for k, v in rules.items() if k != "embed"} == {
        k: v for k, v in LOGICAL_RULES.items() if k != "embed"
    }
    spec = logical_to_spec(("embed", "mlp"), (4, 8), mesh, rules)
    assert tuple(spec) == ("data", "model")
