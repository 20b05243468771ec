"""The version browser's per-sample images drawn by the shard workers (``write_shard(..., sample_files=...)``) while
they hold the arrays: the same bytes publish would draw from the published PNGs, recorded in the shard's marker,
published with the version, and drawn again at publish only where one is missing."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from flows.browser import image_paths, sample_files
from flows.card import card
from flows.pipeline import make_samples
from schemas.spec import spec_hash, validate_spec
from store import DatasetStore
from store.errors import StoreError

SURFACE = {"domain": "surface", "name": "plates", "samples": 6, "material": "cast_metal", "field_of_view_mm": 30,
           "image": {"size": 96, "color": "rgb"}, "shard_size": 3,
           "defects": {"negatives": 0.2, "mixture": ["scratch 3-8 mm", "2 pits 1-1.5 mm"]}}
CT = {"domain": "chest_ct", "name": "lungs", "samples": 4, "shard_size": 2, "seed": 3, "watermark": True,
      "findings": {"negatives": 0.25, "mixture": ["8mm solid nodule, right upper lobe", "0.8 cm GGN in the RUL"]}}


def _build(root: Path, spec_dict: dict, hook, drop: str | None = None) -> tuple[Path, list[dict]]:
    spec = validate_spec(spec_dict)
    b = DatasetStore(root).open_build(spec, json.dumps(spec_dict), spec_hash(spec), "test")
    samples = make_samples(spec, range(spec.samples))
    for i, shard in enumerate(b.shards):
        b.write_shard(i, [s for s in samples if s.index in shard], **({"sample_files": hook} if hook else {}))
    markers = [json.loads(Path(b._marker(i)).read_bytes()) for i in range(len(b.shards))]
    if drop is not None:
        (Path(b.data_dir) / drop).unlink()
    pv = b.publish("run", card=card)
    return root / pv.name / f"v{pv.version}", markers


def _files(vdir: Path) -> dict[str, str]:
    return {str(f.relative_to(vdir)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(vdir.rglob("*")) if f.is_file() and f.name != "manifest.json"}


@pytest.mark.parametrize("spec", [SURFACE, CT], ids=["surface-rgb", "chest-ct-16bit"])
def test_images_drawn_in_the_shards_equal_the_ones_publish_draws(tmp_path, spec):
    drawn_at_publish, m0 = _build(tmp_path / "a", spec, None)
    drawn_in_shards, m1 = _build(tmp_path / "b", spec, sample_files)
    a, b = _files(drawn_at_publish), _files(drawn_in_shards)
    browser_images = [k for k in a if k.startswith("browser/img/")]
    assert len(browser_images) == 4 * spec["samples"]
    assert a == b  # every published byte, browser images, data.js and card included
    ma = json.loads((drawn_at_publish / "manifest.json").read_text())
    mb = json.loads((drawn_in_shards / "manifest.json").read_text())
    assert ma["files"] == mb["files"] and ma["content_digest"] == mb["content_digest"]
    assert all(k in ma["files"] for k in browser_images)
    # The markers record what the shards drew (and their hashes, used by publish instead of reading them back).
    assert all("files_sha256" not in mk for mk in m0)
    recorded = {rel: h for mk in m1 for rel, h in mk["files_sha256"].items()}
    assert recorded == {k: b[k] for k in browser_images}


def test_a_missing_shard_drawn_image_is_drawn_again_at_publish(tmp_path):
    reference, _ = _build(tmp_path / "a", SURFACE, sample_files)
    lost = image_paths("0000004")[2]  # an outline layer
    rebuilt, _ = _build(tmp_path / "b", SURFACE, sample_files, drop=lost)
    assert (rebuilt / lost).read_bytes() == (reference / lost).read_bytes()
    assert _files(rebuilt) == _files(reference)
    m = json.loads((rebuilt / "manifest.json").read_text())
    assert m["files"][lost] == hashlib.sha256((rebuilt / lost).read_bytes()).hexdigest()


def test_extra_files_cannot_overwrite_the_sample_files(tmp_path):
    spec = validate_spec(SURFACE)
    b = DatasetStore(tmp_path).open_build(spec, json.dumps(SURFACE), spec_hash(spec), "test")
    samples = make_samples(spec, b.shards[0])
    with pytest.raises(StoreError, match="would overwrite a file of the version") as e:
        b.write_shard(0, samples, sample_files=lambda s, stored, row, files: {row["image_path"]: b"x"})
    assert "\n" not in str(e.value)
    assert b.finished_shards() == set()  # nothing committed


@pytest.mark.parametrize("spec", [SURFACE, CT], ids=["surface-rgb", "chest-ct-16bit"])
def test_the_outline_layer_over_the_view_is_the_overlay_and_the_view_table_gives_the_same_numbers(tmp_path, spec):
    """The sample page lays the outline layer (indexed PNG, index 0 transparent) over the view: decoded with its alpha
    and composited, it gives exactly the RGB overlay drawn on the view. The view of a 16-bit image comes from a table
    of all stored values: the same numbers as decoding and windowing the image itself; its JPEG is within 40 dB."""
    import cv2
    import numpy as np
    import pyarrow.parquet as pq

    from annotators.overlay import display, instance_outline, outline
    from flows.browser import _view
    from schemas.domain import get_domain
    from store.codec import decode_png
    from store.codecs import codec_for_row

    vdir, _ = _build(tmp_path, spec, sample_files)
    domain = get_domain(spec["domain"])
    ids = list(domain.outline_classes) if domain.outline_classes else None
    drawn = 0
    for r in pq.read_table(vdir / "samples.parquet").to_pylist():
        sid = r["sample_id"]
        stored = decode_png((vdir / r["image_path"]).read_bytes())
        lab, ins = (decode_png((vdir / r[k]).read_bytes()) for k in ("label_path", "instance_path"))
        view = display(codec_for_row(r).decode(stored), domain.display_window)
        thumb, view_p, outline_p, _ = image_paths(sid)
        assert np.array_equal(_view(stored, r, domain), view)  # the table gives the same numbers
        assert view_p.endswith("_view.jpg")
        jpeg = cv2.imdecode(np.frombuffer((vdir / view_p).read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        if view.ndim == 3:
            jpeg = cv2.cvtColor(jpeg, cv2.COLOR_BGR2RGB)
        assert jpeg.shape == view.shape and cv2.PSNR(jpeg, view) >= 40  # a picture for people, close to the view
        bgra = cv2.imdecode(np.frombuffer((vdir / outline_p).read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
        assert bgra.ndim == 3 and bgra.shape[2] == 4 and set(np.unique(bgra[..., 3])) <= {0, 255}
        comp = cv2.cvtColor(view, cv2.COLOR_GRAY2RGB) if view.ndim == 2 else view.copy()
        on = bgra[..., 3] == 255
        comp[on] = bgra[..., 2::-1][on]
        assert np.array_equal(comp, instance_outline(outline(view, lab, domain.classes, classes=ids), ins))
        drawn += int(on.sum())
    assert drawn > 0
