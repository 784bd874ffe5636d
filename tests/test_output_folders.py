"""Output folders never destroy user data (issue 14, part 3).

Every writer of a folder goes through `atomic_output_dir`: an existing non-empty folder that
gemmascope-jax did not create (no `OUTPUT_MARKER` file) is refused unless `--force`; a folder
it created may be replaced where the command regenerates its output (dashboard, trainer
exports, max examples); the root, home and working folders are never replaced. Dictionary
names cannot leave the run folder, and paths read from files cannot leave the file's folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from gemmascope_jax.cli import run_verb
from gemmascope_jax.cli.convert import add_convert_parser
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary
from gemmascope_jax.dictionaries.sets import TranscoderSet
from gemmascope_jax.formats import load_dictionary, save_dictionary
from gemmascope_jax.formats.io import FormatError
from gemmascope_jax.io.files import OUTPUT_MARKER, atomic_output_dir, created_by_us, path_inside

D, F = 8, 12


def _sae(seed=0):
    cfg = DictionaryConfig(kind="sae", architecture="jumprelu", d_in=D, d_out=D, width=F,
                           layers=(1,))  # fmt: skip
    return random_dictionary(cfg, seed=seed)


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("1,2,3")
    return path


def _intact(path: Path) -> bool:
    return (path / "thesis.tex").read_text() == "years of work" and (
        path / "sub" / "data.csv"
    ).read_text() == "1,2,3"


def test_atomic_output_dir_refuses_a_folder_it_did_not_create(tmp_path):
    user = _user_folder(tmp_path / "user")
    for kwargs in ({}, {"replace_ours": True}):
        with (
            pytest.raises(FileExistsError, match=r"did not create it.*--force"),
            atomic_output_dir(user, **kwargs) as tmp,
        ):
            (tmp / "x").write_text("new")
        assert _intact(user)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]  # no temp folder left
    with atomic_output_dir(user, force=True) as tmp:  # the user asked for it
        (tmp / "x").write_text("new")
    assert not (user / "thesis.tex").exists() and created_by_us(user)


def test_folders_we_created_carry_a_marker_and_may_be_replaced(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / OUTPUT_MARKER).is_file() and created_by_us(out)
    with (
        pytest.raises(FileExistsError, match="force"),
        atomic_output_dir(out),
    ):  # a plain save still refuses it
        pass
    with atomic_output_dir(out, replace_ours=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:  # an empty folder is fine
        (tmp / "c").write_text("3")
    assert (empty / "c").is_file()
    file = tmp_path / "file.txt"
    file.write_text("keep")
    with (
        pytest.raises(FileExistsError, match=r"a file.*did not create"),
        atomic_output_dir(file, replace_ours=True),
    ):
        pass
    assert file.read_text() == "keep"


def test_working_home_and_root_folders_are_never_replaced(tmp_path, monkeypatch):
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    for out in (Path("."), work, tmp_path, Path("/")):
        with (
            pytest.raises(FileExistsError, match="even with --force"),
            atomic_output_dir(out, force=True),
        ):
            pass
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = _user_folder(tmp_path / "home")
    with (
        pytest.raises(FileExistsError, match="even with --force"),
        atomic_output_dir(home, force=True),
    ):
        pass
    assert _intact(work) and _intact(home)


def _convert(argv):
    parser = argparse.ArgumentParser(prog="gemmascope-jax")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return run_verb("convert", args.func, args)


def test_convert_refuses_an_existing_folder_without_force(tmp_path, capsys):
    src = save_dictionary(_sae(), tmp_path / "src")
    user = _user_folder(tmp_path / "user")
    assert _convert([str(src), str(user), "--to", "saelens"]) == 2
    assert "did not create it" in capsys.readouterr().err and _intact(user)
    assert _convert([str(src), str(user), "--to", "saelens", "--force"]) == 0
    assert load_dictionary(user).cfg.width == F
    # its own earlier output, too, is replaced only with --force (convert never guesses)
    assert _convert([str(src), str(user), "--to", "native"]) == 2
    with pytest.raises(FileExistsError, match="force"):
        save_dictionary(_sae(1), user, "native")


def test_trainer_exports_replace_only_their_own_folders(tmp_path):
    from gemmascope_jax.training.export import save_export

    path = tmp_path / "export" / "sae_resid_post_1" / "native"
    assert save_export(_sae(0), path, "native", "sae") == str(path)
    assert save_export(_sae(1), path, "native", "sae") == str(path)  # a re-run replaces its export
    np.testing.assert_array_equal(
        np.asarray(load_dictionary(path).arrays()["w_enc"]), np.asarray(_sae(1).arrays()["w_enc"])
    )
    user = _user_folder(tmp_path / "export" / "mine" / "native")
    result = save_export(_sae(2), user, "native", "mine")
    assert result.startswith("skipped:") and "did not create it" in result and _intact(user)


def test_max_examples_save_keeps_user_folders(tmp_path):
    from gemmascope_jax.analysis.max_examples import MaxExamples

    save = MaxExamples.save
    user = _user_folder(tmp_path / "ex")
    with pytest.raises(FileExistsError, match="did not create it"):
        fake = argparse.Namespace(n_tokens=0, left=1, right=1, width=F, layers=[1],
                                  dictionary="d", token_text={})  # fmt: skip
        save(fake, user)
    assert _intact(user)


def test_dashboard_refuses_a_user_folder_before_scanning(tmp_path, capsys, monkeypatch):
    from gemmascope_jax.cli.dashboard import dashboard_command

    user = _user_folder(tmp_path / "runs" / "demo")
    args = argparse.Namespace(out=str(user), force=False, model=None, dictionary="nowhere")

    def fail(*a, **k):
        raise AssertionError("loaded the model before checking --out")

    monkeypatch.setattr("gemmascope_jax.gemma3.loading.load_gemma3", fail)
    assert run_verb("dashboard", dashboard_command, args) == 2
    assert "did not create it" in capsys.readouterr().err and _intact(user)


def test_dashboard_build_replaces_only_dashboards(tmp_path, monkeypatch):
    from gemmascope_jax.analysis import dashboard

    user = _user_folder(tmp_path / "site")
    monkeypatch.setattr(dashboard, "checked_dictionary", lambda model, d: d)
    monkeypatch.setattr(dashboard, "select_latents", lambda ex, latents: [])
    ex = argparse.Namespace(num_latents=F, token_text={})
    with pytest.raises(FileExistsError, match="did not create it"):
        dashboard.build_dashboard(None, None, _sae(), ex, user, latents=[])
    assert _intact(user)


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", ".hidden", "/abs"])
def test_dictionary_names_stay_inside_the_run_folder(name):
    from gemmascope_jax.training.config import ConfigError, load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(demo, [f"dictionaries.0.name={json.dumps(name)}"])
    assert "dictionaries.0.name" in dict(info.value.problems)


def test_dictionary_names_with_dots_inside_are_fine():
    from gemmascope_jax.training.config import load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_config(demo, ["dictionaries.0.name=sae.v2_final"])
    assert cfg.dictionaries[0].name == "sae.v2_final"


def _ct_set(tmp_path) -> Path:
    members = [
        random_dictionary(
            DictionaryConfig(
                kind="transcoder",
                architecture="jumprelu",
                d_in=D,
                d_out=D,
                width=F,
                layers=(i,),
                input_sites=(f"mlp_in.{i}",),
                model_num_layers=2,
            ),  # fmt: skip
            seed=i,
        )
        for i in range(2)
    ]
    return save_dictionary(TranscoderSet.from_transcoders(members), tmp_path / "ct", "ct")


@pytest.mark.parametrize(
    ("entries", "pattern"),
    [
        (["../outside/layer_0.safetensors", "layer_1.safetensors"], "outside the folder"),
        (["ABS", "layer_1.safetensors"], "is absolute"),
        (["layer_0.safetensors", 5], "not a relative path string"),
        (["link/layer_0.safetensors", "layer_1.safetensors"], "outside the folder"),
    ],
)
def test_circuit_tracer_paths_stay_inside_the_folder(tmp_path, entries, pattern):
    folder = _ct_set(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "layer_0.safetensors").write_bytes((folder / "layer_0.safetensors").read_bytes())
    (folder / "link").symlink_to(outside, target_is_directory=True)
    entries = [str(outside / "layer_0.safetensors") if e == "ABS" else e for e in entries]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["transcoders"] = entries
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FormatError, match=pattern) as err:
        load_dictionary(folder)
    assert str(folder / "config.yaml") in str(err.value)


def test_circuit_tracer_relative_paths_inside_the_folder_load(tmp_path):
    folder = _ct_set(tmp_path)
    (folder / "weights").mkdir()
    for i in range(2):
        (folder / f"layer_{i}.safetensors").rename(folder / "weights" / f"layer_{i}.safetensors")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["transcoders"] = [f"weights/layer_{i}.safetensors" for i in range(2)]
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert len(load_dictionary(folder)) == 2


def test_path_inside(tmp_path):
    assert path_inside(tmp_path, "a/b.npy", tmp_path / "m.json") == tmp_path / "a" / "b.npy"
    for bad in ("../x", "/etc/passwd", "", None, "a/../../x"):
        with pytest.raises(FormatError, match=r"m\.json"):
            path_inside(tmp_path, bad, tmp_path / "m.json")


def test_dashboard_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    from gemmascope_jax.cli.dashboard import dashboard_command

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    args = argparse.Namespace(
        out=str(tmp_path / "new"), force=False, model=None, dictionary="x", card=None
    )
    assert run_verb("dashboard", dashboard_command, args) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_save_gemma3_refuses_a_user_folder_without_force(tiny_model, tmp_path):
    """A model saved over a folder gemmascope-jax did not create: refused, naming the folder,
    nothing touched and no temporary folder left; its own earlier save is replaced; a user
    folder only with `force=True` (or the old name, `overwrite=True`)."""
    from gemmascope_jax.gemma3.loading import load_gemma3, save_gemma3

    user = _user_folder(tmp_path / "model")
    with pytest.raises(FileExistsError, match=r"did not create it.*--force") as err:
        save_gemma3(tiny_model, user)
    assert str(user) in str(err.value) and _intact(user)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    out = save_gemma3(tiny_model, tmp_path / "saved")
    assert created_by_us(out)
    (out / "model.safetensors").write_bytes(b"stale")
    assert save_gemma3(tiny_model, out) == out  # a re-save replaces its own folder
    with pytest.raises(FileExistsError, match="force"):
        save_gemma3(tiny_model, out, replace_ours=False)
    loaded, _ = load_gemma3(out, tokenizer=False, progress=False)
    assert loaded.cfg.num_layers == tiny_model.cfg.num_layers

    assert save_gemma3(tiny_model, user, force=True) == user
    assert not (user / "thesis.tex").exists() and created_by_us(user)
    other = _user_folder(tmp_path / "other")
    save_gemma3(tiny_model, other, overwrite=True)
    assert created_by_us(other) and (other / "config.json").is_file()
