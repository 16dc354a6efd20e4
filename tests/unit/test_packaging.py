"""Installable as a library: one import name, a light base install, the command on the PATH."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.unit.test_evaluate_cli import files  # noqa: F401  (fixture: two small exports + h5ad files)

HEAVY = {"deepspeed", "tiledbsoma", "cellxgene-census", "mlflow", "zarr"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from the tracked files of this checkout (copied: a build writes build/ and egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    for rel in ("scpretrain/__init__.py", "scpretrain/cli.py"):  # present before their first commit too
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    return next((tmp / "dist").glob("scpretrain-*.whl"))


def test_wheel_installs_one_import_name_and_a_light_base(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = set(z.namelist())
    assert tops == {"scpretrain"}
    assert {"scpretrain/evaluate/__init__.py", "scpretrain/train/trainer.py", "scpretrain/configs/model/mae_base.yaml",
            "scpretrain/launch/slurm.sbatch"} <= names
    base = [ln.split(":", 1)[1].strip() for ln in meta.splitlines()
            if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    base_names = {b.split(";")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower() for b in base}
    assert base_names and not base_names & HEAVY, base_names & HEAVY
    train = {ln.split(":", 1)[1].split(";")[0].split("<")[0].split(">")[0].strip().lower()
             for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and 'extra == "train"' in ln}
    assert HEAVY <= train


def test_installed_beside_another_evaluate_the_command_embeds_and_annotates(wheel, files, tmp_path):  # noqa: F811
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # this environment's packages, as --system-site-packages would give them; and someone else's `evaluate`
    # (its distutils shim too: on Python 3.12 performer-pytorch imports distutils, which setuptools provides;
    # not its other .pth files: the editable install's finder would map scpretrain back to the checkout)
    here = Path(sysconfig.get_paths()["purelib"])
    shim = here / "distutils-precedence.pth"
    (site / "reuse.pth").write_text(f"{here}\n" + (shim.read_text() if shim.is_file() else ""))
    (site / "evaluate.py").write_text("WHOSE = 'not scpretrain'\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    cmd = env_dir / "bin" / "scpretrain"
    run = lambda *a: subprocess.run([str(cmd), *map(str, a)], cwd=tmp_path, capture_output=True, text=True,  # noqa: E731
                                    timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    v = run("--version")
    assert v.returncode == 0 and v.stdout.startswith("scpretrain ") and "format_version" in v.stdout
    e = run("embed", "--export", files / "mae", "--adata", files / "query.h5ad", "--out", tmp_path / "e.h5ad")
    assert e.returncode == 0, e.stderr[-2000:]
    a = run("annotate", "--export", files / "mae", "--reference", files / "ref.h5ad", "--label-key", "cell_type",
            "--query", files / "query.h5ad", "--out", tmp_path / "a.h5ad")
    assert a.returncode == 0, a.stderr[-2000:]
    import anndata

    assert anndata.read_h5ad(tmp_path / "e.h5ad").obsm["X_mae"].shape[1] == 8
    assert "predicted_cell_type" in anndata.read_h5ad(tmp_path / "a.h5ad").obs
    probe = subprocess.run([str(py), "-c", "import evaluate, scpretrain.evaluate as s; print(evaluate.WHOSE, s.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    whose, ours = probe.stdout.split()[-2:] if probe.returncode == 0 else ("", "")
    assert probe.stdout.startswith("not scpretrain") and str(site) in ours, probe.stderr[-2000:]
