"""The wheel, installed into a fresh environment and run from another folder, as `pip install .` users
(and the Dockerfile) get it: the configs must ship inside the package."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from retinanet.data import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "retinanet", "configs")


def run(argv, cwd, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """(bin folder of a fresh venv holding only the wheel, a folder outside the source tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy, so that building writes nothing into the checkout
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist", source], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("retinanet-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
         "-q", wheel], cwd=tmp)
    # torch & co. come from this environment's site-packages, appended after the venv's own, which
    # holds the wheel's retinanet (a path in a .pth file is not scanned for further .pth files, so
    # this environment's editable install does not leak in).
    site_packages = Path(
        run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp).stdout.strip()
    )
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin", elsewhere


@pytest.mark.slow
def test_wheel_ships_configs_and_converts_and_evaluates_from_another_folder(installed_wheel):
    from test_convert import torchvision_retinanet
    from torchvision.models import resnet18

    bin_dir, cwd = installed_wheel
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = run([bin_dir / "python", "-c", "import retinanet; print(retinanet.__file__)"], cwd, env).stdout
    assert where.startswith(str(bin_dir.parent)), where

    torch.save(torchvision_retinanet(resnet18, "v1", num_classes=3).state_dict(), cwd / "tv.pth")
    run([bin_dir / "retinanet", "convert", "--from", "torchvision", "tv.pth", "ours.pth"], cwd, env)
    make_synthetic(cwd / "data", num_train=2, num_val=2, image_size=64, seed=0)
    run([bin_dir / "retinanet", "eval", "--checkpoint", "ours.pth", "data.val.ann_file=data/annotations/instances_val.json",
         "data.val.img_dir=data/val", "data.num_workers=0", "train.device=cpu", "model.input.min_size_test=64",
         "model.input.max_size_test=64", "--output-dir", "eval"], cwd, env)
    assert (cwd / "eval" / "metrics.json").is_file()
    # A packaged config by the README's path, from a folder that has no configs/.
    shown = run([bin_dir / "python", "-c", "from retinanet.config import load_config; "
                 "print(load_config('configs/quickstart.yaml').model.backbone.depth)"], cwd, env).stdout
    assert shown.strip() == "18"
