"""Every `retinanet ...` command of README.md, run as a user types it (the `retinanet` script,
`torchrun -m retinanet`) from a folder that has no configs/ of its own, on tiny data: a documented
command cannot rot unnoticed.

What the test changes, and only that: placeholders become real files (CKPT, photos/, DIR, `...`), 8
processes become 2 and 2 nodes become 1 on localhost, and small overrides are appended (a tiny model
and dataset, 2 iterations, a fresh output folder per training run). Docker commands are not run (no
Docker engine here); the install and test commands are what CI itself runs.
"""

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import write_jpeg, write_png

from retinanet.data import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
RETINANET = Path(sys.executable).parent / "retinanet"
SYNTHETIC = "synthetic"  # data.synthetic.root of every tiny run, relative to the test folder
TINY_MODEL = [
    "model.backbone.depth=18", "model.backbone.weights=", "model.num_classes=3", "model.fpn.channels=64",
    "model.head.channels=64", "model.anchors.sizes=[8,16,32,64,128]", "model.input.min_size_train=[64]",
    "model.input.max_size_train=64", "model.input.min_size_test=64", "model.input.max_size_test=64",
]
TINY_DATA = [
    f"data.synthetic.root={SYNTHETIC}", "data.synthetic.num_train=8", "data.synthetic.num_val=4",
    "data.synthetic.image_size=64", "data.train.ann_file=", "data.train.img_dir=", "data.val.ann_file=",
    "data.val.img_dir=", "data.num_workers=0", "train.device=cpu",
]
TINY_SCHEDULE = [
    "solver.ims_per_batch=2", "solver.max_iter=2", "solver.steps=[2]", "solver.warmup_iters=1",
    "train.checkpoint_period=1000", "train.eval_period=0", "train.log_period=1",
]


def readme_commands(text: str) -> list[str]:
    """The README's retinanet command lines: those of ```bash blocks (continuations joined, `&&`
    chains split, comments dropped) and inline `retinanet ...` code, in order, duplicates once."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line)
            commands += [part.strip() for part in line.split("&&")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += re.findall(r"`((?:retinanet|torchrun) [^`]+)`", prose)
    is_ours = re.compile(r"^(?:\S*/)?retinanet\s|^torchrun\s.*-m retinanet\s")
    return list(dict.fromkeys(c for c in commands if is_ours.match(c)))


def test_the_readme_commands_are_found():
    commands = readme_commands((ROOT / "README.md").read_text())
    subcommands = {re.search(r"retinanet (\S+)", c).group(1) for c in commands}
    assert {"train", "eval", "infer", "export", "convert", "make-synthetic", "analyze-data", "analyze-errors",
            "convert-dataset"} <= subcommands
    assert any(c.startswith("torchrun") for c in commands)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_run(command: str, index: int, files: dict[str, str]) -> list[str]:
    """argv that runs `command` here (see the module docstring for what changes)."""
    command = re.sub(r"\[[^\]]*\]", "", command)  # optional parts of a synopsis
    tokens = [files.get(token, token) for token in shlex.split(command)]
    if tokens[0] == "torchrun":
        tokens = [sys.executable, "-m", "torch.distributed.run", *tokens[1:]]
        for option, value in (("--nproc-per-node", "2"), ("--nnodes", "1"), ("--node-rank", "0")):
            if option in tokens:
                tokens[tokens.index(option) + 1] = value
        if "--rdzv-endpoint" in tokens:
            tokens[tokens.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{free_port()}"
        subcommand = tokens[tokens.index("retinanet") + 1]
    else:
        tokens[0] = str(RETINANET)
        subcommand = tokens[1]
    if subcommand == "train":
        tokens += TINY_MODEL + TINY_DATA + TINY_SCHEDULE
        if "configs/quickstart.yaml" not in tokens or index > 0:  # the first run fills output/quickstart
            tokens.append(f"train.output_dir=output/readme_{index}")
    elif subcommand == "eval" and tokens[tokens.index("eval") + 1].endswith(".yaml"):
        tokens += TINY_MODEL + TINY_DATA
    elif subcommand == "eval":
        tokens += ["model.input.min_size_test=64", "model.input.max_size_test=64", "data.num_workers=0"]
    elif subcommand == "analyze-data":
        tokens += TINY_MODEL + TINY_DATA + ["--generations", "20"]
    elif subcommand == "make-synthetic":
        tokens += ["--num-train", "2", "--num-val", "2", "--image-size", "32"]
    return tokens


def make_user_files(folder: Path) -> dict[str, str]:
    """The files the README's commands name, and what each placeholder becomes."""
    from test_convert import torchvision_retinanet
    from test_data_formats import _voc_object, _write_image, _write_voc_xml
    from torchvision.models import resnet18

    generator = torch.Generator().manual_seed(0)
    for path in ("photos/a.jpg", "photos/b.jpg", "more/c.jpg"):
        (folder / path).parent.mkdir(exist_ok=True)
        write_jpeg(torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=generator), str(folder / path))
    write_png(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=generator), str(folder / "img.png"))
    voc = folder / "VOCdevkit" / "VOC2007"
    _write_image(voc / "JPEGImages" / "000001.jpg", 48, 64)
    _write_voc_xml(voc, "000001", 64, 48, [_voc_object("dog", 1, 1, 40, 30)])
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    yolo = folder / "datasets" / "mine"
    _write_image(yolo / "images" / "train" / "a.jpg", 48, 64)
    (yolo / "labels" / "train").mkdir(parents=True)
    (yolo / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (yolo / "data.yaml").write_text("names: [cat, dog]\n")
    tv_model = torchvision_retinanet(resnet18, "v1", num_classes=3)
    torch.save(tv_model.state_dict(), folder / "retinanet_resnet50_fpn_coco.pth")
    make_synthetic(folder / "coco_like", num_train=2, num_val=2, image_size=64, seed=0)
    return {
        "CKPT": "output/quickstart/checkpoints/model_final.pth",
        "CONFIG": "configs/quickstart.yaml",
        "DIR": "made_by_readme",
        "datasets/synthetic/annotations/instances_val.json": f"{SYNTHETIC}/annotations/instances_val.json",
        "data.val.ann_file=...": f"data.val.ann_file={folder / 'coco_like/annotations/instances_val.json'}",
        "data.val.img_dir=...": f"data.val.img_dir={folder / 'coco_like/val'}",
    }


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    files = make_user_files(tmp_path)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    commands = readme_commands((ROOT / "README.md").read_text())
    ran = []
    for index, command in enumerate(commands):
        argv = as_run(command, index, files)
        same_as = " ".join(token for token in argv if not token.startswith("train.output_dir="))
        if same_as in ran:  # e.g. the quickstart command, quoted again under "Measured"
            continue
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"README command failed: {command}\nran: {argv}\n{result.stderr[-4000:]}"
        ran.append(same_as)
    assert (tmp_path / "ours.pth").is_file() and (tmp_path / "model.onnx").is_file()
    assert (tmp_path / "out" / "detections.json").is_file()
    assert (tmp_path / "made_by_readme" / "annotations" / "instances_train.json").is_file()
    assert (tmp_path / "voc_trainval.json").is_file() and (tmp_path / "mine_train.json").is_file()
