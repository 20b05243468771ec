"""The dataset store: publish -> read round trips, crash/resume byte identity, concurrent publishes, corruption
detection, pull/verify and one-line errors -- on a local folder and on a real S3-compatible server (moto's server
mode on 127.0.0.1, reached through s3fs), never a mocked client.
"""
from __future__ import annotations

import json
import os
import socket
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.pipeline import make_samples
from schemas.errors import SpecError
from schemas.spec import load_spec_text, spec_hash
from store import DatasetStore, IntegrityError, StoreError, pull, verify_image, verify_version
from store import build as store_build
from store import codec
from store import watermark as wm

CT_TEXT = """
name: store-ct
samples: 6
shard_size: 2
image: {size: 512, spacing_mm: [0.6, 0.8]}
findings:
  negatives: 0.2
  mixture: ["12 mm solid nodule, right lower lobe", "14 mm ground-glass nodule, LUL"]
"""
CODE = "test-code-1"


def _spec(text: str = CT_TEXT, **over):
    spec = load_spec_text(text)
    if over:
        spec = spec.model_copy(update=over)
    return spec


@pytest.fixture(scope="module")
def ct_samples():
    spec = _spec()
    return {s.index: s for s in make_samples(spec, range(spec.samples), digest=spec_hash(spec))}


# ---------------------------------------------------------------- a real S3 server (moto server mode)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            "skip_instance_cache": True, "use_listings_cache": False}
    import boto3
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="pairforge-test")
    yield opts
    server.stop()


_COUNTER = iter(range(10_000))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(root URL, storage options): a fresh local folder, or a fresh prefix in a bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "datasets"), None
    opts = request.getfixturevalue("s3_server")
    return f"s3://pairforge-test/run{next(_COUNTER)}", opts


def build(root_url, opts, samples, spec=None, shards=None, code=CODE, run_id="run-1"):
    spec = spec or _spec()
    st = DatasetStore(root_url, opts)
    b = st.open_build(spec, CT_TEXT, spec_hash(spec), code)
    for i, r in enumerate(b.shards):
        if shards is not None and i not in shards:
            continue
        if not b.has_shard(i):
            b.write_shard(i, [samples[j] for j in r])
    if shards is not None:
        return st, b, None
    return st, b, b.publish(run_id=run_id)


def version_bytes(st: DatasetStore, name: str, version: int) -> dict[str, bytes]:
    base = st.root.version_dir(name, version)
    st.root.refresh()
    out = {}
    for p in st.root.fs.find(base):
        rel = p.split(f"/v{version}/", 1)[1]
        out[rel] = st.root.read_bytes(p)
    return out


# ---------------------------------------------------------------- round trip
def test_publish_then_load_round_trips_pixels_labels_and_findings(root, ct_samples):
    url, opts = root
    st, b, pv = build(url, opts, ct_samples)
    assert (pv.name, pv.version) == ("store-ct", 1)
    assert st.list_datasets() == ["store-ct"] and st.versions("store-ct") == [1]
    files = version_bytes(st, "store-ct", 1)
    assert {"manifest.json", "samples.parquet", "README.md"} <= set(files)
    assert sum(k.startswith("images/") for k in files) == 6 == sum(k.startswith("labels/") for k in files)
    assert sum(k.startswith("instances/") for k in files) == 6
    assert not st.root.exists(st.root.join("store-ct", "_staging", b.key)), "staging must be cleaned"

    ds = st.load("store-ct@v1")
    assert len(ds) == 6
    for d in ds:
        s = ct_samples[d["index"]]
        assert np.array_equal(d["label"], s.label) and d["label"].dtype == np.uint8
        assert np.array_equal(d["instance"], s.instance) and d["instance"].dtype == np.uint16
        want = np.clip(np.rint(s.image), -1024, 65535 - 1024)
        diff = np.abs(d["image"] - want)
        assert diff.max() <= wm.CT_AMPLITUDE_HU  # the watermark's documented bound
        assert diff.max() > 0  # ... and it is there
        if s.instance.any():
            assert diff[s.instance > 0].max() == 0  # findings stay diagnostic: never marked
        assert d["spacing_mm"] == pytest.approx(s.spacing_mm)
        assert [f["equivalent_diameter_mm"] for f in d["measured"]] == \
               [pytest.approx(f["equivalent_diameter_mm"]) for f in s.measured]
        assert [f["kind"] for f in d["requested"]] == [f["kind"] for f in s.requested]
        assert d["watermark_payload"] == wm.payload_for("store-ct", 1, d["index"]).hex

    m = st.manifest("store-ct", 1)
    assert m.counts.samples == 6 and sum(m.counts.splits.values()) == 6
    assert m.counts.class_samples["lung_rll"] >= 1 and m.spec_hash == spec_hash(_spec())
    assert m.samples_parquet_sha256 == codec.sha256(files["samples.parquet"])
    assert m.run_id == "run-1" and m.code.code_version == CODE and m.libraries["numpy"] == np.__version__
    assert m.parent_version is None
    assert "store-ct@v1" in st.show("store-ct@v1")


def test_loader_gives_torch_tensors_and_monai_dicts(tmp_path, ct_samples):
    import monai.data
    import torch

    st, _, _ = build(str(tmp_path), None, ct_samples)
    ds = st.load("store-ct@v1", split="train")
    assert 0 < len(ds) <= 6 and all(d["split"] == "train" for d in ds)
    t = next(ds.torch())
    assert isinstance(t["image"], torch.Tensor) and t["image"].shape == (1, 512, 512)
    assert t["label"].dtype == torch.int64 and t["label"].shape == (512, 512)
    mds = ds.monai(transform=lambda d: {**d, "image": d["image"] / 1000.0})
    assert isinstance(mds, monai.data.Dataset) and len(mds) == len(ds)
    item = mds[0]
    assert item["image"].shape == (1, 512, 512) and item["label"].shape == (1, 512, 512)
    assert np.abs(item["image"]).max() < 3.5  # the transform ran
    loader = monai.data.DataLoader(mds, batch_size=2)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (2, 1, 512, 512)


def test_index_reads_in_pyarrow_duckdb_and_hf_datasets(tmp_path, ct_samples):
    import datasets
    import duckdb

    st, _, _ = build(str(tmp_path / "root"), None, ct_samples)
    path = st.parquet_uri("store-ct@v1")
    t = pq.read_table(path)
    assert t.num_rows == 6 and t.column("index").to_pylist() == list(range(6))
    with_findings = sum(1 for s in ct_samples.values() if s.measured)
    con = duckdb.connect()
    n, = con.execute(f"select count(*) from read_parquet('{path}') where len(measured) > 0").fetchone()
    assert n == with_findings
    diam = con.execute(f"select unnest(measured).equivalent_diameter_mm from read_parquet('{path}')").fetchall()
    assert sorted(round(d[0], 3) for d in diam) == sorted(
        round(f["equivalent_diameter_mm"], 3) for s in ct_samples.values() for f in s.measured)
    passed, = con.execute(f"select count(*) from read_parquet('{path}') where qc.passed").fetchone()
    assert passed == sum(s.qc["passed"] for s in ct_samples.values())
    hf = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    assert len(hf) == 6 and hf[0]["sample_id"] == "0000000"
    assert hf[0]["image_path"] == "images/0000000.png" and isinstance(hf[0]["measured"], list)


def test_parquet_and_png_bytes_are_deterministic(tmp_path, ct_samples):
    s = ct_samples[1]
    f1, row1 = store_build.encode_sample("x", 3, s, CODE, True)
    f2, row2 = store_build.encode_sample("x", 3, s, CODE, True)
    assert f1 == f2 and row1 == row2
    import pyarrow as pa

    from schemas.arrow import SAMPLE_SCHEMA

    t = pa.Table.from_pylist([row1, row2], schema=SAMPLE_SCHEMA)
    assert store_build.parquet_bytes(t) == store_build.parquet_bytes(t)


def test_every_image_png_carries_provenance_itxt(tmp_path, ct_samples):
    from PIL import Image

    st, _, _ = build(str(tmp_path), None, ct_samples)
    p = os.path.join(st.root.version_dir("store-ct", 1), "images", "0000002.png")
    with Image.open(p) as im:
        prov = json.loads(im.text["pairforge"])
    assert prov["dataset"] == "store-ct" and prov["version"] == 1 and prov["sample_id"] == "0000002"
    assert prov["spec_hash"] == spec_hash(_spec()) and prov["watermark"] == wm.payload_for("store-ct", 1, 2).hex
    assert prov["synthetic"] is True


# ---------------------------------------------------------------- crashes, resume, concurrency
class Crash(RuntimeError):
    pass


def test_crash_between_shards_and_during_publish_leave_no_version_and_resume_is_byte_identical(
        root, ct_samples, tmp_path, monkeypatch):
    url, opts = root
    # Reference: an uninterrupted build in a separate local root.
    ref_st, _, _ = build(str(tmp_path / "reference"), None, ct_samples)
    reference = version_bytes(ref_st, "store-ct", 1)

    # 1) crash inside shard 1, after its PNGs but before its index part and commit marker.
    real = store_build.parquet_bytes
    calls = {"n": 0}

    def crashing_parquet(table):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("killed while writing shard 1")
        return real(table)

    monkeypatch.setattr(store_build, "parquet_bytes", crashing_parquet)
    with pytest.raises(Crash):
        build(url, opts, ct_samples)
    monkeypatch.setattr(store_build, "parquet_bytes", real)
    st = DatasetStore(url, opts)
    assert st.list_datasets() == [] and st.versions("store-ct") == []
    with pytest.raises(StoreError, match="no dataset 'store-ct'"):
        st.load("store-ct@v1")

    # 2) resume: same reserved number, shard 0 kept, shard 1 redone; then crash in the commit step of publish.
    _, b, _ = build(url, opts, ct_samples, shards={1})
    assert b.version == 1 and b.finished_shards() == {0, 1}
    for i in (2,):
        b.write_shard(i, [ct_samples[j] for j in b.shards[i]])
    if st.root.local:
        monkeypatch.setattr(store_build, "_commit_local", lambda *a: (_ for _ in ()).throw(Crash("publish")))
    else:
        monkeypatch.setattr(type(st.root), "create_exclusive", _crash_on_manifest(type(st.root).create_exclusive))
    with pytest.raises(Crash):
        b.publish(run_id="run-crashed")
    monkeypatch.undo()
    assert st.list_datasets() == [] and st.versions("store-ct") == []

    # 3) the next build of the same spec resumes every shard and publishes; its bytes equal the reference's.
    b2 = st.open_build(_spec(), CT_TEXT, spec_hash(_spec()), CODE)
    assert b2.version == 1 and b2.finished_shards() == {0, 1, 2}
    pv = b2.publish(run_id="run-2")
    assert pv.version == 1 and st.versions("store-ct") == [1]
    got = version_bytes(st, "store-ct", 1)
    assert set(got) == set(reference)
    differing = [k for k in reference if k != "manifest.json" and got[k] != reference[k]]
    assert differing == []
    m1 = json.loads(got["manifest.json"])
    m0 = json.loads(reference["manifest.json"])
    for k in ("created_at", "run_id", "manifest_sha256"):  # the last covers the first two
        m0.pop(k), m1.pop(k)
    assert m1 == m0


def _crash_on_manifest(real):
    def create_exclusive(self, path, data):
        if path.endswith("manifest.json"):
            raise Crash("killed while committing the manifest")
        return real(self, path, data)
    return create_exclusive


def test_two_concurrent_publishes_get_distinct_versions(root, ct_samples):
    url, opts = root
    specs = [_spec(seed=1), _spec(seed=2)]  # two different builds of the same dataset
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def run(k):
        try:
            spec = specs[k]
            st = DatasetStore(url, opts)
            barrier.wait()
            b = st.open_build(spec, CT_TEXT, spec_hash(spec), CODE)
            for i, r in enumerate(b.shards):
                b.write_shard(i, [ct_samples[j] for j in r])
            barrier.wait()
            results[k] = b.publish(run_id=f"run-{k}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(r.version for r in results.values()) == [1, 2]
    st = DatasetStore(url, opts)
    assert st.versions("store-ct") == [1, 2]
    hashes = {st.manifest("store-ct", v).spec_hash for v in (1, 2)}
    assert hashes == {spec_hash(s) for s in specs}  # neither overwrote the other
    for v in (1, 2):
        assert st.verify_version(f"store-ct@v{v}").ok
        # every image carries its own version number
        assert st.load(f"store-ct@v{v}")[0]["watermark_payload"] == wm.payload_for("store-ct", v, 0).hex


def test_same_build_opened_twice_shares_one_version_and_publish_is_idempotent(tmp_path, ct_samples):
    st, b, pv = build(str(tmp_path), None, ct_samples, shards={0, 1, 2})
    other = st.open_build(_spec(), CT_TEXT, spec_hash(_spec()), CODE)
    assert other.version == b.version and other.finished_shards() == {0, 1, 2}
    first = b.publish()
    assert other.publish() == first and st.versions("store-ct") == [1]
    # A later build of the same spec is a new version whose parent is v1.
    _, _, pv2 = build(str(tmp_path), None, ct_samples)
    assert pv2.version == 2 and st.manifest("store-ct", 2).parent_version == 1


def test_publish_with_missing_shards_is_refused(tmp_path, ct_samples):
    st, b, _ = build(str(tmp_path), None, ct_samples, shards={0, 2})
    with pytest.raises(StoreError, match=r"1 of 3 shards are not written yet \(shards 1\)"):
        b.publish()
    assert st.list_datasets() == []
    with pytest.raises(StoreError, match="must hold samples 2 to 3"):
        b.write_shard(1, [ct_samples[0]])


# ---------------------------------------------------------------- corruption, pull, verify
def test_flipped_byte_is_detected_and_named_by_verify_pull_and_loader(root, ct_samples, tmp_path):
    url, opts = root
    st, _, _ = build(url, opts, ct_samples)
    assert verify_version("store-ct@v1", url, opts).ok
    dest = pull("store-ct@v1", tmp_path / "pulled", url, opts)
    assert os.path.isfile(os.path.join(dest, "manifest.json"))
    assert verify_version("store-ct@v1", str(tmp_path / "pulled")).ok  # the pulled copy is itself a root

    target = st.root.join("store-ct", "v1", "labels", "0000003.png")
    data = bytearray(st.root.read_bytes(target))
    data[len(data) // 2] ^= 0x01
    st.root.fs.pipe_file(target, bytes(data)) if not st.root.local else open(target, "wb").write(bytes(data))

    rep = verify_version("store-ct@v1", url, opts)
    assert not rep.ok and len(rep.problems) == 1 and "labels/0000003.png" in rep.problems[0]
    with pytest.raises(IntegrityError, match=r"labels/0000003\.png: sha256 mismatch") as e:
        pull("store-ct@v1", tmp_path / "pulled-again", url, opts)
    assert e.value.paths == ["labels/0000003.png"] and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "pulled-again" / "store-ct" / "v1")  # no half-pulled copy
    ds = st.load("store-ct@v1")
    bad = [i for i, r in enumerate(ds._rows) if r["sample_id"] == "0000003"][0]
    with pytest.raises(IntegrityError, match=r"labels/0000003\.png"):
        ds[bad]

    # a corrupted index is named too
    idx = st.root.join("store-ct", "v1", "samples.parquet")
    raw = bytearray(st.root.read_bytes(idx))
    raw[100] ^= 0xFF
    st.root.fs.pipe_file(idx, bytes(raw)) if not st.root.local else open(idx, "wb").write(bytes(raw))
    with pytest.raises(IntegrityError, match="samples.parquet"):
        st.load("store-ct@v1")
    assert any("samples.parquet" in p for p in verify_version("store-ct@v1", url, opts).problems)


def test_verify_image_names_dataset_version_and_sample_from_the_watermark(root, ct_samples, tmp_path):
    import cv2

    url, opts = root
    st, _, _ = build(url, opts, ct_samples)
    stored = st.root.read_bytes(st.root.join("store-ct", "v1", "images", "0000004.png"))
    original = tmp_path / "original.png"
    original.write_bytes(stored)
    v = verify_image(original, url, opts)
    assert (v.dataset, v.version, v.index, v.sample_id) == ("store-ct", 1, 4, "0000004")
    assert v.file_matches is True and v.pixels_match is True and v.provenance["sample_id"] == "0000004"

    # same pixels, re-encoded without the provenance chunk
    pixels = codec.decode_png(stored)
    cv2.imwrite(str(tmp_path / "reencoded.png"), pixels)
    v = verify_image(tmp_path / "reencoded.png", url, opts)
    assert v.file_matches is False and v.pixels_match is True and v.provenance is None and v.sample_id == "0000004"

    # an 8-bit lung-window JPEG (q75) of it: recovered from the watermark alone, pixels reported as changed
    hu = pixels.astype(np.float32) - 1024
    win = np.clip(np.rint((hu + 1350) / 1500 * 255), 0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "window.jpg"), win, [cv2.IMWRITE_JPEG_QUALITY, 75])
    v = verify_image(tmp_path / "window.jpg", url, opts)
    assert v.watermark_found and v.ref == "store-ct@v1" and v.index == 4 and v.pixels_match is False
    assert "store-ct@v1" in str(v)

    # without a root the payload still decodes, the name is then only an id
    v = verify_image(tmp_path / "window.jpg", str(tmp_path / "nowhere"))
    assert v.watermark_found and v.dataset is None and v.dataset_id == f"{wm.dataset_id('store-ct'):06x}"


def _surface_samples(spec, color: str) -> dict[int, "Sample"]:
    """Hand-made 8-bit surface samples (brushed-metal-like texture with one scratch), so this store test does not
    depend on the surface generator; the watermark tests use real surface renders."""
    from schemas.sample import Sample

    out = {}
    for k in range(spec.samples):
        rng = np.random.Generator(np.random.PCG64(1000 + k))
        base = 120 + 25 * np.sin(np.arange(256) / 7.0)[None, :] + rng.normal(0, 6, (256, 256))
        label = np.zeros((256, 256), np.uint8)
        label[60 + k:64 + k, 30:150] = 1  # a scratch
        img = np.where(label > 0, base - 40, base)
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        if color == "rgb":
            img = np.stack([img, np.clip(img.astype(int) + 8, 0, 255).astype(np.uint8), img], axis=-1)
        out[k] = Sample(sample_id=f"{k:07d}", index=k, split="train", domain="surface", spacing_mm=50 / 256,
                        image=img, label=label, instance=label.astype(np.uint16),
                        requested=[{"kind": "scratch", "length_mm": 23.4, "region": "top_left"}],
                        measured=[{"instance": 1, "kind": "scratch", "length_mm": 23.2, "width_mm": 0.78,
                                   "region": "top_left", "contrast": 4.1}],
                        params={"request": {}, "layout": {"k": k}, "render": {}},
                        qc={"passed": True, "attempts": 1, "checks": [], "history": []},
                        seed={"spec_hash": "0" * 64, "index": k, "attempt": 0, "seed": 0},
                        generator={"name": "test", "version": "1"})
    return out


def test_surface_rgb_and_grey_round_trip_bit_exact_labels(tmp_path):
    text = ("domain: surface\nname: store-surface\nsamples: 2\nshard_size: 2\nimage: {size: 256, color: %s}\n"
            "defects: {negatives: 0, mixture: ['3 mm scratch on brushed aluminium, top-left']}\n")
    for color, shape in (("grey", (256, 256)), ("rgb", (256, 256, 3))):
        spec = load_spec_text(text % color)
        samples = _surface_samples(spec, color)
        st = DatasetStore(str(tmp_path / color))
        b = st.open_build(spec, text % color, spec_hash(spec), CODE)
        b.write_shard(0, [samples[0], samples[1]])
        b.publish()
        m = st.manifest("store-surface", 1)
        assert m.counts.class_samples == {"good": 2, "scratch": 2} and m.domain == "surface"
        for d in st.load("store-surface@v1"):
            s = samples[d["index"]]
            assert d["image"].dtype == np.uint8 and d["image"].shape == shape == s.image.shape
            assert np.array_equal(d["label"], s.label)
            diff = np.abs(d["image"].astype(int) - s.image.astype(int))
            assert diff.max() == wm.U8_AMPLITUDE
            mse = float(np.mean(diff.astype(float) ** 2))
            assert 10 * np.log10(255 ** 2 / mse) >= 37.5  # scheme v3: cells 3 + template 3 grey levels, clipped to 5
            assert diff[s.instance > 0].max() == 0
            assert d["measured"] == s.measured  # 'contrast' travels in the struct's extra JSON
            assert d["watermark_payload"] == wm.payload_for("store-surface", 1, d["index"]).hex


# ---------------------------------------------------------------- bad input: one clear line
def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and isinstance(e, SpecError)
    return msg


def test_bad_roots_names_and_refs_give_one_clear_line(tmp_path, ct_samples):
    spec = _spec()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(StoreError) as e:
        DatasetStore(str(a_file / "datasets")).open_build(spec, CT_TEXT, spec_hash(spec), CODE)
    assert "not a folder" in _one_line(e.value) and "file.txt" in str(e.value)
    # /sys refuses new folders even to root (tests may run as root, where chmod does not bite)
    with pytest.raises(StoreError) as e:
        DatasetStore("/sys/pairforge-datasets").open_build(spec, CT_TEXT, spec_hash(spec), CODE)
    assert "is not writable" in _one_line(e.value) and "/sys/pairforge-datasets" in str(e.value)
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(StoreError, match="is not writable"):
            DatasetStore(str(ro / "datasets")).open_build(spec, CT_TEXT, spec_hash(spec), CODE)
    with pytest.raises(StoreError) as e:
        DatasetStore("nosuchproto://x/y")
    assert "nosuchproto" in _one_line(e.value) and "accepted" in str(e.value)

    st, _, _ = build(str(tmp_path / "ok"), None, ct_samples)
    for ref, words in [("../etc@v1", "not allowed"), ("store-ct/../../x@v1", "not allowed"), ("store-ct@v9", "v1"),
                       ("store-ct@3", "not valid"), ("other@v1", "no dataset 'other'"), ("Store-CT@v1", "not allowed")]:
        with pytest.raises(StoreError) as e:
            st.load(ref)
        assert words in _one_line(e.value), (ref, str(e.value))
    with pytest.raises(StoreError, match="has no published version 9 .*published versions: v1"):
        pull("store-ct@v9", tmp_path / "p", str(tmp_path / "ok"))
    with pytest.raises(StoreError) as e:
        DatasetStore(str(tmp_path / "missing-root")).load("store-ct@v1")
    assert "does not exist" in _one_line(e.value)
    with pytest.raises(StoreError) as e:
        st.load("store-ct@v1", split="holdout")
    assert "splits there" in _one_line(e.value)
    with pytest.raises(StoreError) as e:
        verify_image(tmp_path / "nope.png", str(tmp_path / "ok"))
    assert "does not exist" in _one_line(e.value)


def test_exclusive_create_refuses_an_existing_object(root):
    url, opts = root
    st = DatasetStore(url, opts)
    path = st.root.join("x", "_versions", "v1.json")
    assert st.root.create_exclusive(path, b"first") is True
    assert st.root.create_exclusive(path, b"second") is False
    assert st.root.read_bytes(path) == b"first"


def test_missing_bucket_and_listing_give_one_line(s3_server, ct_samples):
    import store

    with pytest.raises(StoreError) as e:
        DatasetStore("s3://no-such-bucket-pairforge/x", s3_server).open_build(_spec(), CT_TEXT, spec_hash(_spec()), CODE)
    assert "no-such-bucket-pairforge" in _one_line(e.value)
    url = f"s3://pairforge-test/listing{next(_COUNTER)}"
    build(url, s3_server, ct_samples)
    assert store.list_datasets(url, s3_server) == {"store-ct": [1]}
    assert "store-ct@v1" in store.show("store-ct", url, s3_server)


_PUBLISHER = """
import pickle, sys, time
sys.path.insert(0, {repo!r})
from schemas.spec import spec_hash
from store import DatasetStore
spec, text, samples, url, opts, go = pickle.load(open(sys.argv[1], "rb"))
st = DatasetStore(url, opts)
while time.time() < go:  # both processes start the build at the same moment
    time.sleep(0.005)
b = st.open_build(spec, text, spec_hash(spec), "test-code-1")
for i, r in enumerate(b.shards):
    b.write_shard(i, [samples[j] for j in r])
print(b.publish(run_id=sys.argv[2]).version)
"""


def test_two_publishing_processes_get_distinct_versions(root, ct_samples, tmp_path):
    import pickle
    import subprocess
    import sys
    import time

    url, opts = root
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "publish.py"
    script.write_text(_PUBLISHER.format(repo=repo))
    go = time.time() + 6.0
    procs = []
    for k, seed in enumerate((11, 12)):
        arg = tmp_path / f"job{k}.pkl"
        arg.write_bytes(pickle.dumps((_spec(seed=seed), CT_TEXT, ct_samples, url, opts, go)))
        procs.append(subprocess.Popen([sys.executable, str(script), str(arg), f"proc-{k}"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sorted(int(o[0].strip()) for o in outs) == [1, 2]
    st = DatasetStore(url, opts)
    assert st.versions("store-ct") == [1, 2]
    assert {st.manifest("store-ct", v).run_id for v in (1, 2)} == {"proc-0", "proc-1"}
    assert all(st.verify_version(f"store-ct@v{v}").ok for v in (1, 2))


def test_label_counts_and_nonzero_ids_equal_numpy_on_every_kind_of_map():
    """The per-sample class counts (the shard marker's class_pixels) and the outlined ids come from OpenCV's
    histogram for uint8 maps: the same numbers as np.bincount / np.unique, including empty and full maps; other
    dtypes and 3-D volumes take numpy's path."""
    from annotators.overlay import _nonzero_ids
    from store.build import label_counts

    rng = np.random.default_rng(5)
    maps = [np.zeros((64, 48), np.uint8), np.full((33, 17), 255, np.uint8), rng.integers(0, 256, (512, 512), np.uint8),
            ((rng.random((97, 131)) < 0.2) * rng.integers(1, 40, (97, 131))).astype(np.uint8),
            rng.integers(0, 30, (6, 20, 20)).astype(np.uint8)]
    for a in maps:
        assert np.array_equal(label_counts(a), np.bincount(a.ravel(), minlength=256))
        assert label_counts(a).dtype == np.int64
        if a.ndim == 2:
            assert np.array_equal(_nonzero_ids(a), np.unique(a[a > 0]))
    ins = ((rng.random((40, 40)) < 0.1) * rng.integers(1, 900, (40, 40))).astype(np.uint16)
    assert np.array_equal(_nonzero_ids(ins), np.unique(ins[ins > 0]))
