"""Run configs: YAML + extends + key=value overrides, validation errors that name the key,
every shipped config validates (preset depths, no model loading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmascope_jax.gemma3.config import preset
from gemmascope_jax.training.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    parse_value,
)
from gemmascope_jax.training.config_sections import MeshConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = CONFIGS / "demo.yaml"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "base.yaml")
# docs/gemma3.md, row "GS2 subset layers".
SUBSET_LAYERS = {"270m": (5, 9, 12, 15), "1b": (7, 13, 17, 22)}


def _problems(overrides, device_count=None, path=DEMO):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, device_count=device_count)
    return dict(info.value.problems), str(info.value)


def test_demo_is_the_make_demo_job():
    cfg = load_config(DEMO, device_count=1)
    assert cfg.model.source == "embedded" and cfg.model_arch().num_layers == 18
    sae, tc = cfg.dictionaries
    assert (sae.kind, sae.architecture, sae.input_sites, sae.output_sites) == (
        "sae",
        "jumprelu",
        ("resid_post.9",),
        ("resid_post.9",),
    )
    assert (tc.kind, tc.input_sites, tc.output_sites, tc.skip) == (
        "skip_transcoder",
        ("mlp_in.9",),
        ("mlp_out.9",),
        True,
    )
    assert sae.width == tc.width == 4096 and sae.l0_target == tc.l0_target == 32
    # docs/recipe.md (Matryoshka): groups 1/32, 1/16, 1/8, 1/4, rest
    # -> prefixes 1/32, 3/32, 7/32, 15/32, 1.
    assert sae.matryoshka_widths == tuple(4096 * n // 32 for n in (1, 3, 7, 15, 32))
    assert tc.matryoshka_widths is None
    assert cfg.data.cache_dir and cfg.data.epochs > 1
    assert set(cfg.export.formats) == {"gemma-scope-2", "saelens", "native"}
    assert cfg.checkpoint_dir == Path("runs/demo/checkpoints")
    assert "resid_post.9 -> resid_post.9" in cfg.describe()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path, device_count=8)
    depth = cfg.model_arch().num_layers
    for d in cfg.dictionaries:
        assert all(0 <= layer < depth for layer in d.layers)
        assert d.width % cfg.mesh.shape(8)[1] == 0
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    json.dumps(cfg.to_dict())
    saved = cfg.save(tmp_path / "config.yaml")
    assert load_config(saved) == cfg  # the dump in a run dir is a loadable config
    assert cfg.describe().count("\n") >= 5


def test_base_validates_with_a_dictionary():
    with pytest.raises(ConfigError, match="dictionaries: at least one"):
        load_config(CONFIGS / "base.yaml")
    cfg = load_config(
        CONFIGS / "base.yaml", ["dictionaries=[{kind: sae, layers: 9, l0_target: 60}]"]
    )
    assert cfg.dictionaries[0].name == "sae_resid_post_9"
    assert cfg.train.adam_betas == (0.0, 0.999) and cfg.train.bandwidth == 0.001
    assert cfg.train.lr == 7e-5 and cfg.train.batch_tokens == 4096


@pytest.mark.parametrize("size", ["270m", "1b"])
def test_gs2_recipes_use_the_subset_layers_and_gs2_hook_points(size):
    sae = load_config(CONFIGS / f"gs2/resid_post_{size}_16k.yaml")
    assert tuple(d.layers[0] for d in sae.dictionaries) == SUBSET_LAYERS[size]
    widths = {load_config(CONFIGS / f"gs2/resid_post_{size}_{w}.yaml").dictionaries[0].width
              for w in ("16k", "65k", "262k")}  # fmt: skip
    assert widths == {16384, 65536, 262144}
    tc = load_config(CONFIGS / f"gs2/skip_transcoder_{size}.yaml").dictionaries[1]
    dc = tc.dictionary_config(10, 10, model_num_layers=preset(size).num_layers)
    layer = SUBSET_LAYERS[size][1]
    assert dc.hf_hook_points_in == (f"model.layers.{layer}.pre_feedforward_layernorm.output",)
    assert dc.hf_hook_points_out == (f"model.layers.{layer}.post_feedforward_layernorm.output",)
    assert dc.skip and dc.matryoshka_widths[-1] == dc.width == 16384
    clt = load_config(CONFIGS / f"gs2/clt_{size}.yaml").dictionaries[0]
    assert clt.layers == tuple(range(preset(size).num_layers))
    assert clt.width * len(clt.layers) in (262_080,)  # GS2 "262k" CLT label (docs/formats.md)


def test_crosscoder_recipe():
    (xc,) = load_config(CONFIGS / "gs2/crosscoder_1b.yaml").dictionaries
    assert xc.layers == SUBSET_LAYERS["1b"] and xc.width * 4 == 262_144
    assert xc.input_sites == xc.output_sites == tuple(f"resid_post.{i}" for i in xc.layers)


def test_overrides_are_yaml_scalars_at_dotted_keys():
    cfg = load_config(
        DEMO,
        [
            "train.steps=100",
            "train.lr=1e-4",
            "dictionaries.0.width=8192",
            "dictionaries.-1.l0_target=16",
            "mesh.data=-1",
            "mesh.model=2",
            "mesh.fsdp=true",
            "mesh.distributed.coordinator_address=10.0.0.1:1234",
            "mesh.distributed.num_processes=2",
            "mesh.distributed.process_id=1",
            "export.formats=[gs2, sae_lens]",
            "run.dir=/tmp/x",
        ],
        device_count=4,
    )
    assert cfg.train.steps == 100 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.dictionaries[0].width == 8192
    assert cfg.dictionaries[0].matryoshka_widths == (256, 768, 1792, 3840, 8192)
    assert cfg.dictionaries[1].l0_target == 16.0
    assert cfg.mesh.shape(4) == (2, 2) and cfg.mesh.fsdp is True
    assert cfg.mesh.distributed_kwargs() == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    assert cfg.export.formats == ("gemma-scope-2", "saelens")
    assert cfg.report_dir == Path("/tmp/x/report")
    auto = load_config(DEMO, ["mesh.distributed=auto"])
    assert auto.mesh.distributed_kwargs() == {} and MeshConfig().distributed_kwargs() is None
    # dictionary_defaults apply to every dictionary; an item's own key wins
    both = load_config(DEMO, ["dictionary_defaults.width=2048"])
    assert [d.width for d in both.dictionaries] == [2048, 2048]


def test_parse_value_and_override_errors():
    assert parse_value("7e-5") == 7e-5 and parse_value("[5, 9]") == [5, 9]
    assert parse_value("null") is None and parse_value("true") is True
    assert parse_value("1/32") == "1/32"
    raw = {"a": {"b": [{"c": 1}]}, "s": "auto"}
    assert apply_overrides(raw, ["a.b.0.c=2"])["a"]["b"][0]["c"] == 2
    assert raw["a"]["b"][0]["c"] == 1  # a copy
    for bad, key in (("a.b.5.c=1", "a.b.5.c"), ("s.x=1", "s.x"), ("nokey", "nokey")):
        with pytest.raises(ConfigError) as info:
            apply_overrides(raw, [bad])
        assert info.value.problems[0][0] == key


@pytest.mark.parametrize(
    "overrides, device_count, key, text",
    [
        (["train.setps=5"], None, "train.setps", "did you mean 'train.steps'"),
        (["trian.steps=5"], None, "trian", "did you mean 'train'"),
        (["dictionaries.0.widht=5"], None, "dictionaries.0.widht", "'dictionaries.0.width'"),
        (["dictionary_defaults.l0_targt=5"], None, "dictionary_defaults.l0_targt", "l0_target"),
        (["train.steps=abc"], None, "train.steps", "expected int"),
        (["train.steps=0"], None, "train.steps", ">= 1"),
        (["train.lr=[1]"], None, "train.lr", "expected float"),
        (["train.adam_betas=[0.9]"], None, "train.adam_betas", "2 items"),
        (["train.adam_betas=[0.9, 1.5]"], None, "train.adam_betas", "[0, 1)"),
        (["train.lr_schedule=step"], None, "train.lr_schedule", "one of"),
        (["mesh.model=3"], 8, "mesh", "does not fit 8 device"),
        (["mesh.data=3", "mesh.model=1"], 8, "mesh", "does not fit"),
        (["mesh.data=-1", "mesh.model=-1"], 8, "mesh", "at most one"),
        (["mesh.model=0"], None, "mesh.model", "-1 or >= 1"),
        (["mesh.data=3"], None, "train.batch_tokens", "not divisible by the mesh data"),
        (["mesh.distributed={coordinator_address: 'h:1', num_processes: 3, process_id: 0}"],
         None, "data.batch_size", "split evenly"),
        (["mesh.distributed={coordinator_address: 'h:1', num_processes: 2}"], None,
         "mesh.distributed.process_id", "required"),
        (["mesh.distributed={coordinator_address: 'h:1', num_processes: 2, process_id: 2}"],
         None, "mesh.distributed.process_id", "must be <"),
        (["dictionaries.0.input_sites=bogus.3"], None, "dictionaries.0.input_sites.0",
         "unknown site"),
        (["dictionaries.0.input_sites=resid_post.18"], None, "dictionaries.0.input_sites.0",
         "out of range"),
        (["dictionaries.1.output_sites=model.layers.9.nope.output"], None,
         "dictionaries.1.output_sites.0", "unknown site"),
        (["dictionaries.0.input_sites=null", "dictionaries.0.layers=[30]"], None,
         "dictionaries.0.layers.0", "out of range for a 18-layer model"),
        (["dictionaries.0.input_sites=null"], None, "dictionaries.0.layers", "required"),
        (["dictionaries.0.l0_target=4096"], None, "dictionaries.0.l0_target", "< width"),
        (["dictionaries.0.l0_target=null"], None, "dictionaries.0.l0_target", "required"),
        (["dictionaries.0.width=4004", "mesh.model=8"], 8, "dictionaries.0.width",
         "not divisible by the mesh model axis (8)"),
        (["dictionaries.0.kind=sea"], None, "dictionaries.0.kind", "one of"),
        (["dictionaries.0.architecture=gelu"], None, "dictionaries.0.architecture",
         "unknown architecture"),
        (["dictionaries.0.architecture=topk"], None, "dictionaries.0.k", "required for topk"),
        (["dictionaries.1.k=8"], None, "dictionaries.1.k", "only topk"),
        (["dictionaries.0.architecture=topk", "dictionaries.0.k=5000"], None,
         "dictionaries.0.k", "<= width"),
        (["dictionaries.0.skip=true"], None, "dictionaries.0.skip", "cannot have skip"),
        (["dictionaries.0.sparse_groups=4"], None, "dictionaries.0.sparse_groups",
         "sparse_k, which is not set"),
        (["dictionaries.0.sparse_k=64", "dictionaries.0.sparse_groups=5"], None,
         "dictionaries.0.sparse_groups", "must divide sparse_k"),
        (["dictionaries.1.skip=false"], None, "dictionaries.1.skip", "cannot have skip"),
        (["dictionaries.0.matryoshka=[0.5, 0.75]"], None, "dictionaries.0.matryoshka",
         "do not split"),
        (["dictionaries.0.matryoshka=[512, 256]"], None, "dictionaries.0.matryoshka",
         "not increasing"),
        (["dictionaries.0.matryoshka=[0.5, 8]"], None, "dictionaries.0.matryoshka", "mix"),
        (["dictionaries.0.name=a/b"], None, "dictionaries.0.name", "names folders"),
        (["dictionaries.1.name=resid_post_9_matryoshka"], None, "dictionaries", "duplicate"),
        (["data.cache_dir=null"], None, "data.epochs", "needs data.cache_dir"),
        (["data.sources=[{type: parquet}]"], None, "data.sources.0.path", "required"),
        (["data.sources=[{type: csv, path: x}]"], None, "data.sources.0.type", "one of"),
        (["data.shuffle_buffer_tokens=100"], None, "data.shuffle_buffer_tokens", ">= train"),
        (["export.formats=[native, onnx]"], None, "export.formats.1", "unknown dictionary format"),
        (["model.preset=3b"], None, "model.preset", "unknown Gemma 3 preset"),
        (["dictionaries=[]"], None, "dictionaries", "at least one"),
        (["dictionaries.0=5"], None, "dictionaries.0", "expected a mapping"),
    ],
)  # fmt: skip
def test_validation_errors_name_the_key(overrides, device_count, key, text):
    problems, message = _problems(overrides, device_count)
    assert key in problems, problems
    assert text in problems[key], problems[key]
    assert f"  {key}: " in message


def test_all_problems_reported_at_once():
    problems, _ = _problems(
        ["train.steps=x", "mesh.model=3", "dictionaries.0.l0_target=99999", "data.seq_len=1"], 8
    )
    # structure errors come first and stop before meaning is checked
    assert set(problems) == {"train.steps", "data.seq_len"}
    problems, _ = _problems(["mesh.model=16", "dictionaries.0.l0_target=99999"], 8)
    assert set(problems) == {"mesh", "dictionaries.0.l0_target"}


def test_extends_merges_mappings_replaces_lists_and_detects_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "train: {steps: 7, lr: 1e-3}\ndictionaries: [{kind: sae, layers: 1, l0_target: 4}]\n"
    )
    (tmp_path / "b.yaml").write_text(
        "extends: a.yaml\ntrain: {steps: 9}\n"
        "dictionaries: [{kind: transcoder, layers: 2, l0_target: 8, width: 64}]\n"
    )
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.train.steps, cfg.train.lr) == (9, 1e-3)
    assert [(d.kind, d.layers) for d in cfg.dictionaries] == [("transcoder", (2,))]
    (tmp_path / "c.yaml").write_text("extends: d.yaml\n")
    (tmp_path / "d.yaml").write_text("extends: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("extends: missing.yaml\n")
    problems, _ = _problems([], path=tmp_path / "e.yaml")
    assert "no such file" in problems["extends"]


def test_depth_from_a_model_dir_and_unknown_depth(tmp_path):
    tiny = preset("tiny")  # 7 layers
    (tmp_path / "config.json").write_text(json.dumps(tiny.to_hf()))
    src = [f"model.source={tmp_path}"]
    cfg = load_config(
        DEMO,
        [
            *src,
            "dictionaries.0.input_sites=resid_post.-1",
            "dictionaries.1.input_sites=null",
            "dictionaries.1.output_sites=null",
            "dictionaries.1.layers=6",
        ],
    )
    assert cfg.model_arch().num_layers == 7
    assert cfg.dictionaries[0].input_sites == ("resid_post.6",)
    assert cfg.dictionaries[1].output_sites == ("mlp_out.6",)
    problems, _ = _problems(src)  # the demo's layer-9 sites do not exist in 7 layers
    assert "out of range" in problems["dictionaries.0.input_sites.0"]
    # a source whose depth is unknown: sites are checked for form only
    unknown = ["model.source=acme/custom-lm"]
    assert load_config(DEMO, unknown).model_arch() is None
    problems, _ = _problems(
        [*unknown, "dictionaries.0.input_sites=null", "dictionaries.0.layers=all"]
    )
    assert "set model.preset" in problems["dictionaries.0.layers"]
    cfg = load_config(
        DEMO, [*unknown, "model.preset=1b", "dictionaries.0.input_sites=resid_post.25"]
    )
    assert cfg.dictionaries[0].layers == (25,)


def test_dictionary_config_bridge():
    cfg = load_config(DEMO)
    sae = cfg.dictionaries[0].dictionary_config(640, 640, model_name="gemma-3-270m")
    assert (sae.d_in, sae.width, sae.l0_target, sae.layers) == (640, 4096, 32, (9,))
    assert sae.matryoshka_widths == (128, 384, 896, 1920, 4096)
    assert sae.hf_hook_points_in == ("model.layers.9.output",)  # docs/formats.md, Sites
    assert sae.extra["name"] == "resid_post_9_matryoshka"


def test_defaults_and_round_trip_of_special_values():
    cfg = load_config(
        DEMO,
        [
            "mesh.distributed=auto",
            "dictionaries.0.matryoshka=['1/4', '1/4']",
            "dictionaries.1.matryoshka=[1024, 2048]",
        ],
    )
    assert cfg.dictionaries[0].matryoshka_widths == (1024, 2048, 4096)
    assert cfg.dictionaries[1].matryoshka_widths == (1024, 2048, 4096)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_single_layer_kind_over_several_layers_is_one_dictionary_per_layer():
    cfg = load_config(CONFIGS / "gs2" / "transcoder_all_270m.yaml", device_count=1)
    assert [d.name for d in cfg.dictionaries] == [f"transcoder_all_{i}" for i in range(18)]
    assert [d.input_sites for d in cfg.dictionaries] == [(f"mlp_in.{i}",) for i in range(18)]
    assert all(d.kind == "skip_transcoder" and d.skip for d in cfg.dictionaries)
    cfg = load_config(DEMO, ["dictionaries=[{kind: sae, layers: [3, 5], l0_target: 8}]"])
    assert [d.input_sites for d in cfg.dictionaries] == [("resid_post.3",), ("resid_post.5",)]
    problems, _ = _problems(["dictionaries=[{kind: sae, layers: [3, 40], l0_target: 8}]"])
    assert "layers.0" in next(k for k in problems if "layer 40" in k)


def test_sparse_decode_options_reach_the_loss_and_are_checked():
    from gemmascope_jax.training.config import dictionary_trainings

    cfg = load_config(DEMO, ["dictionaries.0.sparse_k=64", "dictionaries.0.topk_recall=0.95"])
    assert (cfg.dictionaries[0].sparse_k, cfg.dictionaries[0].topk_recall) == (64, 0.95)

    class _Model:
        cfg = preset("270m")

    loss = dictionary_trainings(cfg, _Model())[0].loss
    assert (loss.sparse_k, loss.topk_recall) == (64, 0.95)
    problems, _ = _problems(
        ["dictionaries.1.architecture=topk", "dictionaries.1.k=8", "dictionaries.1.sparse_k=8"]
    )
    assert "dictionaries.1.sparse_k" in problems
    problems, _ = _problems(["dictionaries.0.topk_recall=1.5"])
    assert "dictionaries.0.topk_recall" in problems
