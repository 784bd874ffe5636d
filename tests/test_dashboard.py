"""The static feature dashboard, opened from disk in Debian's headless Chromium (selenium).

`make test` installs `chromium` + `chromium-driver` when /usr/bin/chromedriver is missing;
nothing is downloaded at test time (selenium is pointed at the system chromedriver).
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from gemmascope_jax.analysis.dashboard import build_dashboard, select_latents
from gemmascope_jax.analysis.max_examples import scan_corpus
from gemmascope_jax.dictionaries import DictionaryConfig, random_dictionary

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
)


def _sae_and_batches(seed: int, n_batches: int):
    """A random JumpReLU SAE on the tiny model's layer 3 and [2, 24] token batches, BOS first."""
    cfg = DictionaryConfig(
        kind="sae", architecture="jumprelu", d_in=64, d_out=64, width=48, layers=(3,)
    )
    rng = np.random.RandomState(seed)
    batches = [rng.randint(4, 512, size=(2, 24)).astype(np.int32) for _ in range(n_batches)]
    for b in batches:
        b[:, 0] = 2
    return random_dictionary(cfg, 0), batches


@pytest.fixture(scope="module")
def site(tiny_model, tmp_path_factory):
    d, batches = _sae_and_batches(seed=0, n_batches=3)
    ex = scan_corpus(tiny_model, d, batches, top_n=5, left=4, right=2, progress=False)
    out = tmp_path_factory.mktemp("dash") / "site"
    index = build_dashboard(tiny_model, None, d, ex, out, latents=10, progress=False)
    return index, ex


def test_dashboard_files_and_selection(site):
    index, ex = site
    root = index.parent
    data = (root / "assets" / "index_data.js").read_text()
    entries = json.loads(data.removeprefix("window.GSJ_INDEX = ").rstrip().rstrip(";"))["latents"]
    chosen = select_latents(ex, 10)
    assert [e["flat"] for e in entries] == chosen and len(chosen) == 10
    order = ex.fire_counts[chosen]
    assert (np.diff(order[:8]) <= 0).all()  # the most frequent first (75 % of the pages)
    for e in entries:
        assert (root / e["href"]).is_file() and (root / e["href"]).with_suffix(".png").is_file()
    assert (root / "max_examples" / "max_examples.npz").is_file()
    with pytest.raises(ValueError, match="out of range"):
        select_latents(ex, [48])


def test_dashboard_links_the_quality_card(tiny_model, tmp_path):
    from gemmascope_jax.evals.card import write_card

    d, batches = _sae_and_batches(seed=1, n_batches=2)
    card = write_card(d, tiny_model, batches, tmp_path / "card", absorption=False)
    ex = scan_corpus(tiny_model, d, batches, top_n=3, left=2, right=1, progress=False)
    index = build_dashboard(
        tiny_model,
        None,
        d,
        ex,
        tmp_path / "site",
        latents=4,
        progress=False,
        card=tmp_path / "card",
    )
    page = index.read_text()
    assert 'href="card/card.md"' in page and f"FVU {card['gemma_scope']['fvu']:.3g}" in page
    for name in ["card.json", "card.md", *card["plots"]]:
        assert (index.parent / "card" / name).is_file()
    (tmp_path / "not_a_card").mkdir()
    with pytest.raises(ValueError, match="not a quality card"):
        build_dashboard(
            tiny_model,
            None,
            d,
            ex,
            tmp_path / "site2",
            progress=False,
            card=tmp_path / "not_a_card",
        )
    assert not (tmp_path / "site2").exists()


@pytest.mark.skipif(shutil.which(CHROMEDRIVER) is None, reason="chromium-driver not installed")
def test_dashboard_in_headless_chromium(site, tmp_path):
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    index, ex = site
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(index.as_uri())
        assert _errors(driver) == []
        entries = driver.execute_script("return window.GSJ_INDEX.latents;")
        target = entries[3]
        box = driver.find_element(By.ID, "search")
        box.send_keys(target["name"])
        hits = driver.find_elements(By.CSS_SELECTOR, "#results .hit a")
        assert hits and hits[0].text == f"latent {target['name']}"
        token = target["top"][0]
        box.clear()
        box.send_keys(token)
        found = [
            a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#results a")
        ]
        assert any(h.endswith(target["href"]) for h in found)
        driver.get(index.parent.joinpath(target["href"]).as_uri())
        assert driver.find_element(By.TAG_NAME, "h1").text == f"Latent {target['name']}"
        assert driver.find_elements(By.CSS_SELECTOR, ".example span.max")
        assert _errors(driver) == []
        shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
        assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 10  # not blank
    finally:
        driver.quit()


def _errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
