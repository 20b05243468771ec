"""The card and every store operation against S3 with a custom endpoint and keys: moto's real server on a
non-default port, non-default credentials given only as the store's ``storage_options`` (no AWS environment
variables; without the options nothing reaches the server). build (Prefect flow, with the rich card), ls, show,
load, verify, gc and export through the library; ls, show, verify and gc through the command line with the options
in a pairforge.toml.
"""
from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

import bench.faults as faults
from conftest import tiny_spec_text

KEY, SECRET = "pairforge-key-7Q2", "pairforge-secret-9Zx4"


@pytest.fixture()
def no_aws_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.aws either
    monkeypatch.delenv("PAIRFORGE_STORAGE_OPTIONS", raising=False)


@pytest.fixture()
def custom_s3():
    port = faults._free_port()
    while port in (5000, 9000, 4566):
        port = faults._free_port()
    with faults.moto_server(bucket="custom-endpoint", key=KEY, secret=SECRET, port=port) as (endpoint, opts):
        assert endpoint.endswith(f":{port}") and opts["key"] == KEY and opts["secret"] == SECRET
        yield endpoint, opts


def _card_files(st, name):
    files = {p.split("/v1/", 1)[1] for p in st.root.fs.find(st.root.version_dir(name, 1))}
    return sorted(f for f in files if f.startswith("card/"))


def test_card_and_every_store_operation_use_only_the_storage_options(no_aws_env, custom_s3, tmp_path, monkeypatch):
    """The store API and the card the flow's publish calls (flows.card.card, handed the store's options)."""
    from flows.card import card
    from flows.cli import app
    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text, spec_hash
    from store import DatasetStore, list_datasets, show, verify_version
    from store.export import export_version

    endpoint, opts = custom_s3
    url = "s3://custom-endpoint/team/datasets"
    text = tiny_spec_text(name="endpoint-ct", samples=4, shard_size=2)
    spec = load_spec_text(text)
    st = DatasetStore(url, opts)
    b = st.open_build(spec, text, spec_hash(spec), "endpoint-code")
    for i, r in enumerate(b.shards):
        b.write_shard(i, make_samples(spec, r, digest=spec_hash(spec)))
    assert b.publish(run_id="endpoint", card=card).version == 1
    cards = _card_files(st, "endpoint-ct")
    assert "card/sample_grid.png" in cards and "card/finding_sizes.png" in cards  # the rich card was written
    readme = st.root.read_bytes(st.root.join("endpoint-ct", "v1", "README.md")).decode()
    assert "card/sample_grid.png" in readme
    assert set(st.manifest("endpoint-ct", 1).files) >= set(cards)  # and hashed into the manifest

    assert list_datasets(url, opts) == {"endpoint-ct": [1]}
    assert "endpoint-ct" in show("endpoint-ct@v1", url, opts)
    ds = st.load("endpoint-ct@v1")
    assert len(ds) == 4 and ds[0]["label"].shape == (256, 256)
    rep = verify_version("endpoint-ct@v1", url, opts)
    assert rep.ok and rep.files_checked == 3 * 4 + len(st.manifest("endpoint-ct", 1).files)
    assert st.gc(older_than_s=0.0).dead == []  # nothing left behind by the build
    out = export_version(url, "endpoint-ct@v1", "nnunet", tmp_path / "nnunet", storage_options=opts)
    assert out["source"] == "endpoint-ct@v1" and any((tmp_path / "nnunet").rglob("*.json"))

    # the command line: the options come from pairforge.toml in the working folder
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "pairforge.toml").write_text(
        f'root = "{url}"\n\n[storage_options]\nkey = "{KEY}"\nsecret = "{SECRET}"\nskip_instance_cache = true\n'
        f'\n[storage_options.client_kwargs]\nendpoint_url = "{endpoint}"\nregion_name = "us-east-1"\n')
    monkeypatch.chdir(proj)
    runner = CliRunner()
    for args, want in ((["ls"], "endpoint-ct"), (["show", "endpoint-ct@v1"], "endpoint-ct"),
                       (["verify", "endpoint-ct@v1"], "OK"), (["gc"], "no dead builds")):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and want in res.output, (args, res.output, res.stderr)


def test_the_build_flow_writes_its_card_through_the_storage_options(prefect_api, no_aws_env, custom_s3):
    from flows.build import run_build
    from store import DatasetStore, verify_version

    endpoint, opts = custom_s3
    url = "s3://custom-endpoint/flow"
    s = run_build(tiny_spec_text(name="endpoint-flow", samples=4, shard_size=2), root=url, runner="threads",
                  workers=1, storage_options=opts)
    assert s["version"] == 1 and s["uri"] == f"{url}/endpoint-flow/v1"
    st = DatasetStore(url, opts)
    assert "card/sample_grid.png" in _card_files(st, "endpoint-flow")
    assert verify_version("endpoint-flow@v1", url, opts).ok
    assert st.gc(older_than_s=0.0).dead == []
