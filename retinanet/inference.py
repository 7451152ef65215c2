"""Detection on image files and tensors from a checkpoint: the `Detector` API and the `infer` command.

Boxes are xyxy in absolute pixels of each input image, as given (no resizing visible to the caller).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file, write_jpeg
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from .checkpoint import load_model
from .modeling import RetinaNet

logger = logging.getLogger(__name__)

ImageInput = Tensor | str | os.PathLike

# What torchvision.io.decode_image reads; a folder's other files are not images to us.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
# What the infer command writes besides the drawn images.
DETECTIONS_FILE = "detections.json"
SKIPPED_FILE = "skipped.json"

def read_image(path: str | os.PathLike) -> Tensor:
    """uint8 (3, H, W) RGB pixels of an image file (grayscale and RGBA become RGB).

    Raises:
        ValueError naming the file if it cannot be read or decoded.
    """
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work.
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from None
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


class Detector:
    """A model ready for prediction: eval mode, on its device, with its class names.

    Args:
        model: a RetinaNet; put in eval mode.
        device: "cpu", "cuda", a torch.device or None (CUDA when available).
        batch_size: images per forward pass in `predict`.
    """

    def __init__(self, model: RetinaNet, device: str | torch.device | None = None, batch_size: int = 4):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.class_names = list(model.class_names)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        score_thresh: float | None = None,
        config_path: str | os.PathLike | None = None,
        batch_size: int = 4,
        overrides: Sequence[str] = (),
    ) -> Detector:
        """The model described by the checkpoint's config and class names (or by `config_path`).

        score_thresh: replaces model.inference.score_thresh when given.
        overrides: KEY=VALUE config overrides (e.g. model.inference.nms_thresh=0.6).
        """
        model, _ = load_model(path, config_path, overrides)
        if score_thresh is not None:
            model.postprocessor.score_thresh = float(score_thresh)
        return cls(model, device, batch_size)

    def predict(
        self, inputs: ImageInput | Sequence[ImageInput], batch_size: int | None = None
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Detect objects in one image or a list of them.

        Args:
            inputs: a (3, H, W) tensor (float RGB in 0..1 or uint8), an image file path, or a list of
                them (a (B, 3, H, W) tensor counts as a list). Files are read a batch at a time.
            batch_size: images per forward pass (default: the detector's).
        Returns:
            per image {"boxes": (D, 4) float xyxy pixels of that image, "scores": (D,), "labels": (D,)
            int64 0..K-1, "class_names": D names}, on the CPU, best first; a dict for a single input,
            a list for a list.
        """
        single = isinstance(inputs, (str, os.PathLike)) or (isinstance(inputs, Tensor) and inputs.dim() == 3)
        items = [inputs] if single else list(inputs)
        batch_size = batch_size or self.batch_size
        outputs = []
        for start in range(0, len(items), batch_size):
            images = [self._as_image(item) for item in items[start : start + batch_size]]
            outputs.extend(self._forward(images))
        return outputs[0] if single else outputs

    @staticmethod
    def _as_image(item: ImageInput) -> Tensor:
        if isinstance(item, Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(item.shape)}")
            return item
        return read_image(item)

    @torch.inference_mode()
    def _forward(self, images: list[Tensor]) -> list[dict[str, Any]]:
        detections = self.model([image.to(self.device) for image in images])
        results = []
        for det in detections:
            det = {key: value.cpu() for key, value in det.items()}
            det["class_names"] = [self.class_names[label] for label in det["labels"].tolist()]
            results.append(det)
        return results


# ----------------------------------------------------------------------------------------------
# The `infer` command.


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by `inputs`: files, folders (their images, sorted) and glob patterns.

    Raises:
        FileNotFoundError: an input that is neither a file, a folder nor a glob, or no image at all.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                logger.warning("%s: no image (%s) in this folder", path, ", ".join(IMAGE_SUFFIXES))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif any(char in str(item) for char in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not found:
                logger.warning("%s: the pattern matches no file", item)
            files.extend(found)
        else:
            raise FileNotFoundError(f"input not found: {item} (expected an image file, a folder or a glob pattern)")
    files = list(dict.fromkeys(files))
    if not files:
        raise FileNotFoundError(f"no image found in {[str(item) for item in inputs]}")
    return files


def _color(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    sector, fraction = int(hue * 6), hue * 6 % 1.0
    high, low, rising, falling = 230, 40, int(40 + 190 * fraction), int(230 - 190 * fraction)
    return [(high, rising, low), (falling, high, low), (low, high, rising),
            (low, falling, high), (rising, low, high), (high, low, falling)][sector]


def draw_detections(image: Tensor, detections: dict[str, Any]) -> Tensor:
    """uint8 (3, H, W) image with each box, its class name and score drawn on it."""
    if not len(detections["boxes"]):
        return image
    labels = [f"{name} {score:.2f}" for name, score in zip(detections["class_names"], detections["scores"].tolist())]
    colors = [_color(label) for label in detections["labels"].tolist()]
    width = max(1, round(min(image.shape[-2:]) / 300))
    return draw_bounding_boxes(image, detections["boxes"], labels=labels, colors=colors, width=width)


def _output_name(path: Path, used: set[str]) -> str:
    """`<stem>.jpg`, or `<stem>_<n>.jpg` when another input already took that name."""
    name, n = f"{path.stem}.jpg", 1
    while name in used:
        name, n = f"{path.stem}_{n}.jpg", n + 1
    used.add(name)
    return name


def drawn_image_paths(files: Sequence[Path], output_dir: Path) -> list[Path]:
    """Where the drawn copy of each input goes, in input order; fixed before any image is read, so a
    skipped image never changes another's name."""
    used: set[str] = set()
    return [output_dir / _output_name(path, used) for path in files]


def check_outputs_spare_inputs(files: Sequence[Path], outputs: Sequence[Path], output_dir: Path) -> None:
    """Refuse an output folder where writing would replace the inputs or mix with them.

    Args:
        files: the input images.
        outputs: every file the command would write.
        output_dir: the output folder (need not exist yet).
    Raises:
        ValueError naming the input: an output path that is an input file (real paths compared, so
        through symlinks too), or an output folder that holds an input (the drawn images would sit
        among the originals and be read as inputs by the next run on that folder).
    """
    real_out = os.path.realpath(output_dir)
    advice = f"choose another output folder, e.g. --output {real_out}_detections"
    input_by_real_path = {os.path.realpath(path): path for path in files}
    for output in outputs:
        overwritten = input_by_real_path.get(os.path.realpath(output))
        if overwritten is not None:
            raise ValueError(f"--output {output_dir}: writing {output} would overwrite the input image {overwritten}; {advice}")
    for path in files:
        if real_out in (os.path.realpath(path.parent), os.path.dirname(os.path.realpath(path))):
            raise ValueError(
                f"--output {output_dir} holds the input image {path}: drawn images would be written among "
                f"(and could replace) the originals; {advice}"
            )


class InferCounts(NamedTuple):
    """What the infer command did: images processed (drawn and listed) and images skipped."""

    processed: int
    skipped: int


def infer_command(
    checkpoint: str,
    inputs: Sequence[str],
    output_dir: str,
    config_path: str | None = None,
    score_thresh: float = 0.3,
    batch_size: int = 4,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> InferCounts:
    """Detect objects in image files; write drawn images, detections.json and skipped.json.

    Every image is processed on its own: one that cannot be read, detected or drawn is logged with
    its file name and the reason, listed in skipped.json and skipped; the others are still written.

    Args:
        checkpoint: a trainer checkpoint.
        inputs: image files, folders (their .jpg/.jpeg/.png/.webp/.gif files, sorted) and glob patterns.
        output_dir: a folder holding no input; receives `<stem>.jpg` per image (boxes, class names
            and scores drawn), detections.json: [{"file", "width", "height", "detections": [{"box":
            [x1, y1, x2, y2] pixels, "score", "label", "class_name"}]}] of the processed images, in
            input order, and skipped.json: [{"file", "reason"}] of the others.
        config_path: a config replacing the checkpoint's (e.g. another test size).
        score_thresh: keep detections scoring above this.
        batch_size: images per forward pass; a batch whose forward fails is retried image by image.
        device: "cpu" or "cuda"; default CUDA when available.
        overrides: KEY=VALUE config overrides.
    Returns:
        how many images were processed and skipped.
    Raises:
        ValueError before anything is written, if an output would overwrite or sit among the inputs
        (see check_outputs_spare_inputs).
    """
    files = collect_images(inputs)
    out = Path(output_dir)
    drawn_paths = drawn_image_paths(files, out)
    check_outputs_spare_inputs(files, [*drawn_paths, out / DETECTIONS_FILE, out / SKIPPED_FILE], out)
    detector = Detector.from_checkpoint(checkpoint, device, score_thresh, config_path, batch_size, overrides)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(files), desc="infer", unit="img") as progress:
        for start in range(0, len(files), batch_size):
            batch = slice(start, start + batch_size)
            loaded = []  # (path, drawn_path, image) of the batch's readable images
            for path, drawn_path in zip(files[batch], drawn_paths[batch]):
                try:
                    loaded.append((path, drawn_path, read_image(path)))
                except ValueError as err:
                    _skip(skipped, path, err)
            results = _detect_each(detector, [image for _, _, image in loaded])
            for (path, drawn_path, image), result in zip(loaded, results):
                if isinstance(result, Exception):
                    _skip(skipped, path, result)
                    continue
                try:
                    _write_drawn(image, result, drawn_path)
                except (RuntimeError, ValueError) as err:
                    _skip(skipped, path, err)
                    continue
                records.append(_record(path, image, result))
            progress.update(len(files[batch]))
    (out / DETECTIONS_FILE).write_text(json.dumps(records, indent=1))
    (out / SKIPPED_FILE).write_text(json.dumps(skipped, indent=1))
    if records:
        logger.info("%d images processed (%d skipped); results in %s", len(records), len(skipped), out)
    else:
        logger.error("no image could be processed: all %d skipped (reasons in %s)", len(skipped), out / SKIPPED_FILE)
    return InferCounts(len(records), len(skipped))


def _detect_each(detector: Detector, images: list[Tensor]) -> list[dict[str, Any] | Exception]:
    """Detections of each image, or the error its forward raised.

    The batch goes through the model together; if that fails, each image goes alone, so that one
    bad image costs only itself.
    """
    if not images:
        return []
    try:
        return list(detector.predict(images))
    except (RuntimeError, ValueError) as err:  # RuntimeError includes torch.OutOfMemoryError
        if len(images) == 1:
            return [err]
        logger.warning("a batch of %d images failed (%s); retrying them one by one", len(images), err)
    results: list[dict[str, Any] | Exception] = []
    for image in images:
        try:
            results.append(detector.predict(image))
        except (RuntimeError, ValueError) as err:
            results.append(err)
    return results


def _write_drawn(image: Tensor, detections: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its encoders in favour of torchcodec; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        write_jpeg(draw_detections(image, detections), str(path), quality=90)


def _skip(skipped: list[dict[str, str]], path: Path, reason: Exception) -> None:
    logger.warning("skipping %s: %s", path, reason)
    skipped.append({"file": str(path), "reason": str(reason)})


def _record(path: Path, image: Tensor, det: dict[str, Any]) -> dict[str, Any]:
    detections = [
        {"box": box, "score": score, "label": label, "class_name": name}
        for box, score, label, name in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), det["class_names"]
        )
    ]
    return {"file": str(path), "width": image.shape[-1], "height": image.shape[-2], "detections": detections}
