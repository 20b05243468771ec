"""The base install is enough for the default job: ``validate``, ``preview`` and ``build`` with the procedural backend
run with the diffusion and MONAI stacks made unimportable in every process of the command (the CLI, its workers,
the local API server), and none of them even tries to import them. A feature that needs an extra names it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "diffusers", "transformers", "controlnet_aux", "monai", "safetensors")

BLOCKER = textwrap.dedent(f"""
    import os, sys
    _HEAVY = {HEAVY!r}

    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _HEAVY:
                with open(os.environ["PAIRFORGE_BLOCK_LOG"], "a") as f:
                    f.write(f"{{os.getpid()}} {{name}}\\n")
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
""")

SPEC = """\
name: lean-ct
domain: chest_ct
samples: 4
seed: 1
image: {size: 256, spacing_mm: [1.2, 1.4]}
findings:
  mixture: ["8mm solid nodule, right upper lobe"]
shard_size: 2
"""


@pytest.fixture
def without_heavy(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "blocked.log"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "PAIRFORGE_BLOCK_LOG": str(log),
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)

    def run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=timeout)

    run.log, run.spec, run.tmp = log, spec, tmp_path
    return run


def _attempts(run) -> str:
    return run.log.read_text() if run.log.exists() else ""


def test_the_blocker_really_hides_torch(without_heavy):
    r = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, "PYTHONPATH": str(
        without_heavy.tmp / "site"), "PAIRFORGE_BLOCK_LOG": str(without_heavy.log)}, capture_output=True, text=True)
    assert r.returncode == 1 and "No module named 'torch'" in r.stderr
    assert "torch" in _attempts(without_heavy)


def test_validate_preview_and_build_never_import_torch(without_heavy):
    run = without_heavy
    r = run("validate", str(run.spec))
    assert r.returncode == 0 and r.stdout.startswith("ok: lean-ct"), r.stdout + r.stderr
    r = run("preview", str(run.spec), "--out", "pv", "-n", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((run.tmp / "pv").glob("*_image.png"))) == 2
    r = run("build", str(run.spec), "--root", "ds", "--workers", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "published lean-ct@v1" in r.stdout
    assert (run.tmp / "ds" / "lean-ct" / "v1" / "manifest.json").exists()
    assert _attempts(run) == "", f"imports of the heavy stack were attempted:\n{_attempts(run)}"


def test_controlnet_without_the_diffusion_extra_names_the_extra(without_heavy):
    run = without_heavy
    spec = run.tmp / "cn.yaml"
    spec.write_text(SPEC.replace("shard_size: 2", "shard_size: 2\ngenerator: {name: controlnet, options: "
                                 "{base_model: /nowhere}}"))
    r = run("validate", str(spec))
    assert r.returncode == 0, r.stderr  # the spec is fine; rendering it needs the extra
    r = run("build", str(spec), "--root", "ds")
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "pip install 'pairforge[diffusion]'" in line and "torch is not installed" in line, line


def test_loaders_without_the_monai_extra_name_the_extra(without_heavy, tmp_path):
    code = textwrap.dedent("""
        from schemas.extras import MissingExtra, import_extra
        try:
            import_extra("monai.data", "VersionDataset.monai()", "monai")
        except MissingExtra as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}"
                       f"{os.pathsep}{REPO}", "PAIRFORGE_BLOCK_LOG": str(without_heavy.log)},
                       capture_output=True, text=True)
    assert r.stdout.strip() == ("VersionDataset.monai() needs the 'monai' extra (monai is not installed): "
                                "pip install 'pairforge[monai]'"), r.stdout + r.stderr
