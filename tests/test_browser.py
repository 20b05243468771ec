"""The static version browser in a real headless Chromium (Debian's ``chromium`` package): the index loads from a
folder (file://, no server, no network), filters change the shown count to what the version's data says, a sample
page opens with its image, label, overlay, measurements, QC and drawn parameters; and a screenshot is taken."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows import browser
from flows.browser import detail_path
from flows.card import card
from flows.pipeline import make_samples
from schemas.spec import spec_hash, validate_spec
from store import DatasetStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")

SPEC = {"domain": "surface", "name": "plates", "samples": 12, "material": "cast_metal", "field_of_view_mm": 30,
        "image": {"size": 128, "color": "rgb"}, "shard_size": 6, "splits": {"train": 0.6, "val": 0.1, "test": 0.3},
        "defects": {"negatives": 0.25, "mixture": ["scratch 3-8 mm", "2 pits 1-1.5 mm", "stain 2-4 mm"]}}


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser") / "datasets"
    spec = validate_spec(SPEC)
    samples = make_samples(spec, range(spec.samples))
    b = DatasetStore(root).open_build(spec, json.dumps(SPEC), spec_hash(spec), "test")
    for i, shard in enumerate(b.shards):
        b.write_shard(i, [s for s in samples if s.index in shard])
    with pytest.MonkeyPatch.context() as mp:  # several detail chunks (5, 5, 2 samples), as a large version has
        mp.setattr(browser, "DETAIL_CHUNK", 5)
        b.publish("test-run", card=card)
    return root / "plates" / "v1"


def chromium(*args: str) -> str:
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--virtual-time-budget=4000", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def shown(version_dir: Path, filters: str = "") -> int:
    dom = chromium("--dump-dom", f"{(version_dir / 'index.html').as_uri()}#{filters}")
    m = re.search(r'id="count">(\d+)<', dom)
    assert m, dom[:2000]
    return int(m.group(1))


def data(version_dir: Path, details: bool = True) -> dict:
    """browser/data.js (the index's fields of each sample), with each sample's details from its browser/detail chunk
    merged in unless ``details=False``."""
    text = (version_dir / "browser" / "data.js").read_text()
    d = json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))
    if details:
        for i, x in enumerate(d["samples"]):
            chunk = (version_dir / detail_path(i // d["detail_chunk"])).read_text()
            x.update(json.loads(chunk[chunk.index(",") + 1:].rstrip().rstrip(";").rstrip(")"))[x["id"]])
    return d


def test_the_index_data_has_only_what_the_index_shows_and_each_sample_is_in_one_detail_chunk(version_dir):
    d = data(version_dir, details=False)
    assert all(set(x) == {"id", "split", "kinds", "sizes", "regions", "qc_passed"} for x in d["samples"])
    chunks = sorted((version_dir / "browser" / "detail").glob("*.js"))
    assert d["detail_chunk"] == 5 and len(chunks) == 3
    full = data(version_dir)["samples"]
    assert all({"measured", "requested", "qc", "seed", "generator", "codec", "spacing_mm"} <= set(x) for x in full)


def test_index_loads_and_filters_change_the_shown_count(version_dir):
    d = data(version_dir)
    s = d["samples"]
    assert shown(version_dir) == len(s) == 12
    n_scratch = sum("scratch" in x["kinds"] for x in s)
    n_neg = sum(not x["kinds"] for x in s)
    n_test = sum(x["split"] == "test" for x in s)
    n_size = sum(any(2 <= v <= 5 for v in x["sizes"]) for x in s)
    assert 0 < n_scratch < len(s) and 0 < n_neg < len(s)
    assert shown(version_dir, "kind=scratch") == n_scratch
    assert shown(version_dir, "kind=-") == n_neg
    assert shown(version_dir, "split=test") == n_test
    assert shown(version_dir, "min=2&max=5") == n_size
    assert shown(version_dir, "kind=scratch&split=test") == sum("scratch" in x["kinds"] and x["split"] == "test"
                                                                  for x in s)
    html = (version_dir / "index.html").read_text() + (version_dir / "browser" / "app.js").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network


def test_a_sample_page_shows_image_label_overlay_measurements_qc_and_parameters(version_dir):
    s = [x for x in data(version_dir)["samples"] if x["measured"]][-1]  # in the last detail chunk
    dom = chromium("--dump-dom", f"{(version_dir / 'sample.html').as_uri()}#{s['id']}")
    assert f"sample {s['id']}" in dom
    for k, f in (("view", "view.jpg"), ("label", "label.png"), ("overlay", "view.jpg"), ("outline", "outline.png")):
        assert f'id="img-{k}" ' in dom and f'src="browser/img/{s["id"]}_{f}"' in dom
        assert (version_dir / "browser" / "img" / f"{s['id']}_{f}").is_file()
    for h in ("Measurements", "QC", "Drawn parameters"):
        assert f"<h3>{h}</h3>" in dom
    assert str(s["measured"][0]["area_mm2"]) in dom and s["requested"][0]["kind"] in dom


def test_screenshot_of_the_index_shows_the_thumbnails(version_dir, tmp_path):
    import cv2

    shot = tmp_path / "browser.png"
    chromium("--window-size=900,560", f"--screenshot={shot}", (version_dir / "index.html").as_uri())
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (560, 900)
    # thumbnails are grey metal with yellow outlines: many distinct pixels, some yellow ones
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 500
    yellow = (img[..., 2] > 200) & (img[..., 1] > 200) & (img[..., 0] < 80)
    assert yellow.sum() > 20


def test_screenshot_of_a_sample_page_shows_the_outlines_over_the_view(version_dir, tmp_path):
    """The overlay is the view with the transparent outline layer on top: the browser composites it."""
    import cv2

    s = next(x for x in data(version_dir)["samples"] if x["measured"])
    shot = tmp_path / "sample.png"
    chromium("--window-size=1100,420", f"--screenshot={shot}", f"{(version_dir / 'sample.html').as_uri()}#{s['id']}")
    img = cv2.imread(str(shot))
    yellow = (img[..., 2] > 200) & (img[..., 1] > 180) & (img[..., 0] < 80)  # instance outlines (255, 220, 0)
    cols = np.flatnonzero(yellow.any(axis=0))
    assert yellow.sum() > 20 and cols.min() > 600  # only in the third figure, the overlay (each is 320 px wide)
    # Elsewhere the overlay is the view: the third figure repeats the first, shifted by two figures' width.
    a = img[100:400, 20:320].astype(int)
    same = max((np.abs(a - img[100:400, 20 + dx:320 + dx]).max(axis=2) <= 2).mean() for dx in range(640, 672))
    assert same > 0.98


def test_show_open_names_the_browser_of_a_version(version_dir, monkeypatch):
    import webbrowser

    from flows.cli import app

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url))
    res = CliRunner().invoke(app, ["show", "plates@v1", "--open", "--root", str(version_dir.parent.parent)])
    assert res.exit_code == 0, res.output
    assert opened == [(version_dir / "index.html").resolve().as_uri()]
