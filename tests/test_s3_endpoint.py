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


def test_build_card_and_every_store_operation_use_only_the_storage_options(prefect_api, no_aws_env, tmp_path,
                                                                           monkeypatch):
    from flows.build import run_build
    from flows.cli import app
    from store import DatasetStore, list_datasets, show, verify_version
    from store.export import export_version

    port = faults._free_port()
    while port in (5000, 9000, 4566):
        port = faults._free_port()
    with faults.moto_server(bucket="custom-endpoint", key=KEY, secret=SECRET, port=port) as (endpoint, opts):
        assert endpoint.endswith(f":{port}") and opts["key"] == KEY and opts["secret"] == SECRET
        url = "s3://custom-endpoint/team/datasets"

        s = run_build(tiny_spec_text(name="endpoint-ct", samples=4, shard_size=2), root=url, runner="threads",
                      workers=1, storage_options=opts)
        assert s["version"] == 1 and s["uri"] == f"{url}/endpoint-ct/v1"
        st = DatasetStore(url, opts)
        files = {p.split("/v1/", 1)[1] for p in st.root.fs.find(st.root.version_dir("endpoint-ct", 1))}
        cards = sorted(f for f in files if f.startswith("card/"))
        assert "card/sample_grid.png" in cards and "card/finding_sizes.png" in cards  # the rich card was written
        readme = st.root.read_bytes(st.root.join("endpoint-ct", "v1", "README.md")).decode()
        assert "card/sample_grid.png" in readme
        assert st.manifest("endpoint-ct", 1).files.keys() >= set(cards)  # and hashed into the manifest

        assert list_datasets(url, opts) == {"endpoint-ct": [1]}
        assert "endpoint-ct@v1" in show("endpoint-ct@v1", url, opts)
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
                           (["verify", "endpoint-ct@v1"], "ok"), (["gc"], "no dead builds")):
            res = runner.invoke(app, args)
            assert res.exit_code == 0 and want in res.output, (args, res.output, res.stderr)
