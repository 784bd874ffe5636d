"""One CLI convention for every verb (gemmascope_jax/cli/): bad input -> exit 2 and one line
`gemmascope-jax VERB: error: MESSAGE` on stderr that names what was wrong (a config's
problems are listed under it), no traceback, and no output left behind. Each verb is run on a
missing dictionary, a missing model and an unknown site (where it takes one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmascope_jax.cli import main
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.formats import save_dictionary
from gemmascope_jax.formats.sets import save_transcoder_set
from tests.hf_reference import tiny_causal_lm

D_MODEL, N_LAYERS = 64, 7  # tests/hf_reference.tiny_text_config


@pytest.fixture(scope="module")
def files(tmp_path_factory, gguf_path):
    """A tiny random Gemma 3 (real tokenizer), an SAE and a transcoder set that fit it."""
    from gemmascope_jax.gemma3.tokenizer import load_tokenizer_from_gguf

    root = tmp_path_factory.mktemp("cli")
    model = root / "model"
    tiny_causal_lm(seed=1, vocab_size=262_144).save_pretrained(model)
    load_tokenizer_from_gguf(gguf_path).save(model)
    base = dict(architecture="jumprelu", d_in=D_MODEL, d_out=D_MODEL, width=16)
    sae = DictionaryConfig(kind="sae", layers=(2,), model_num_layers=N_LAYERS, **base)
    save_dictionary(random_dictionary(sae, seed=0), root / "sae")
    transcoders = [
        random_dictionary(
            DictionaryConfig(kind="transcoder", layers=(layer,), model_num_layers=N_LAYERS, **base),
            seed=layer,
        )
        for layer in range(N_LAYERS)
    ]
    save_transcoder_set(TranscoderSet(transcoders), root / "transcoders")
    return {"model": str(model), "sae": str(root / "sae"), "tc": str(root / "transcoders")}


def _argv(verb: str, dictionary: str, model: str, out: Path) -> list[str]:
    """The smallest command line of `verb` that reaches its loading of files."""
    out = str(out)
    return {
        "steer": ["steer", "--dictionary", dictionary, "--model", model, "--feature", "0", "hi"],
        "refusal": ["refusal", "--dictionary", dictionary, "--model", model, "--out", out],
        "jailbreak": ["jailbreak", "--dictionary", dictionary, "--model", model, "--out", out]
        + ["hi"],
        "cot": ["cot", "--dictionary", dictionary, "--model", model, "--out", out, "why?"],
        "inspect": ["inspect", "--dictionary", dictionary, "--model", model, "hi"],
        "dashboard": ["dashboard", "--dictionary", dictionary, "--model", model, "--out", out],
        "evaluate": ["evaluate", dictionary, "--model", model, "--out", out],
        "attribute": ["attribute", "--transcoders", dictionary, "--model", model, "--out", out]
        + ["hi"],
        "convert": ["convert", dictionary, out, "--to", "native"],
        "demo": ["demo", "--model", model, "--out", out],
        "rollouts": ["rollouts", "packaged", "--model", model, "--out", f"{out}.jsonl"],
    }[verb]


def _check_error(capsys, verb: str, rc: int, *named: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, f"{verb}: exit {rc}\n{err}"
    prefix = f"gemmascope-jax {verb}: error: "
    assert prefix in err and "Traceback" not in err, err
    message = err[err.index(prefix) :]  # one line; a config's problems are listed below it
    for what in named:
        assert what in message, (what, err)
    return message


DICTIONARY_VERBS = ["steer", "refusal", "jailbreak", "cot", "inspect", "dashboard", "evaluate"]


@pytest.mark.parametrize("verb", [*DICTIONARY_VERBS, "attribute", "convert"])
def test_missing_dictionary(verb, files, tmp_path, capsys):
    missing = str(tmp_path / "no_such_dictionary")
    out = tmp_path / "out"
    rc = main(_argv(verb, missing, files["model"], out))
    _check_error(capsys, verb, rc, missing)
    assert not out.exists() and not Path(f"{out}.jsonl").exists()


@pytest.mark.parametrize("verb", [*DICTIONARY_VERBS, "attribute", "demo", "rollouts"])
def test_missing_model(verb, files, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    dictionary = files["tc"] if verb == "attribute" else files["sae"]
    out = tmp_path / "out"
    rc = main(_argv(verb, dictionary, missing, out))
    _check_error(capsys, verb, rc, missing)
    assert not out.exists() and not Path(f"{out}.jsonl").exists()


def test_unknown_site_refusal(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv("refusal", files["sae"], files["model"], out) + ["--site", "resid_post.99"]
    _check_error(capsys, "refusal", main(argv), "resid_post.99")
    assert not out.exists()


@pytest.fixture
def tiny_run_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "extends: " + str(Path(__file__).parents[1] / "configs" / "base.yaml") + "\n"
        "model: {preset: tiny}\n"
        "dictionaries:\n"
        "  - {name: sae_bad, kind: sae, input_sites: resid_post.99, width: 32, l0_target: 4}\n"
    )
    return path


@pytest.mark.parametrize("verb", ["train", "plan", "finetune"])
def test_config_verbs_bad_site_and_missing_config(verb, tiny_run_config, tmp_path, capsys):
    extra = ["--topology", "v5e:2x2"] if verb == "plan" else []
    _check_error(capsys, verb, main([verb, str(tiny_run_config), *extra]), "resid_post.99")
    missing = str(tmp_path / "no_such.yaml")
    _check_error(capsys, verb, main([verb, missing, *extra]), missing)


def test_unknown_preset_in_sites(capsys):
    _check_error(capsys, "sites", main(["sites", "--preset", "999b"]), "999b")


def test_debug_env_reraises(files, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMASCOPE_JAX_DEBUG", "1")
    with pytest.raises((ValueError, OSError)):
        main(_argv("inspect", str(tmp_path / "nope"), files["model"], tmp_path / "out"))
