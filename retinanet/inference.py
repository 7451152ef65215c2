"""Detection on image files, arrays and tensors from a checkpoint: the `Detector` API, drawings
people can read, and the `infer` command.

Boxes are xyxy in absolute pixels of each input image, as given (no resizing visible to the caller);
for a file, of the image as viewers show it (EXIF orientation applied, see retinanet.data.image).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePath
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from .checkpoint import load_model
from .config import Config, get_key, load_config, parse_override
from .data.image import IMAGE_SUFFIXES, pil_to_tensor_rgb, read_image
from .modeling import RetinaNet
from .visualize import DISPLAY_SCORE_THRESH, draw_detections_on

logger = logging.getLogger(__name__)

# One image for Detector.predict; see Detector.predict for the layouts each may have.
ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor

# A float image must hold values in 0..1; this much outside is tolerated (resampling overshoot),
# more means another scale (0..255) or a normalised image, which would give no detection at all.
FLOAT_RANGE_TOLERANCE = 0.25
# What the infer command writes besides the drawn images.
DETECTIONS_FILE = "detections.json"
SKIPPED_FILE = "skipped.json"
# The infer command draws detections above this score unless the user sets one (see
# infer_score_thresh and retinanet.visualize).
INFER_SCORE_THRESH = DISPLAY_SCORE_THRESH
SCORE_THRESH_KEY = "model.inference.score_thresh"
# Drawn-image formats the infer command keeps; any other input (WEBP, GIF, BMP, TIFF) is drawn as PNG.
KEPT_SUFFIXES = (".jpg", ".jpeg", ".png")
JPEG_QUALITY = 90


class Detector:
    """A model ready for prediction: eval mode, on its device, with its class names.

    Args:
        model: a RetinaNet; put in eval mode.
        device: "cpu", "cuda", a torch.device or None (CUDA when available).
        batch_size: images per forward pass in `predict`.
        compile: the low-latency path (see `compile_for_inference`): on a GPU the network runs
            under torch.compile with CUDA graphs (a camera's frames compile once, a dataset of varied
            sizes about twice); on the CPU, or where compiling fails, it stays eager (logged).
    """

    def __init__(
        self, model: RetinaNet, device: str | torch.device | None = None, batch_size: int = 4, compile: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.class_names = list(model.class_names)
        self.batch_size = batch_size
        if compile:
            compile_for_inference(self.model, self.device)

    @property
    def compiled(self) -> bool:
        """Whether the network runs compiled (False once a failed compilation fell back to eager)."""
        return self.model.network_compiled

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        score_thresh: float | None = None,
        config_path: str | os.PathLike | None = None,
        batch_size: int = 4,
        overrides: Sequence[str] = (),
        compile: bool = False,
    ) -> Detector:
        """The model described by the checkpoint's config and class names (or by `config_path`).

        score_thresh: keep detections scoring above this; default the config's
            model.inference.score_thresh (0.05 unless the config sets it: the evaluation threshold,
            which keeps many weak detections; pass e.g. 0.3 to show results to people, as
            `retinanet infer` does).
        overrides: KEY=VALUE config overrides (e.g. model.inference.nms_thresh=0.6).
        compile: the low-latency path (see the class); model.inference.compile=true asks for it too.
        """
        model, cfg = load_model(path, config_path, overrides)
        if score_thresh is not None:
            model.postprocessor.score_thresh = float(score_thresh)
        return cls(model, device, batch_size, compile=compile or cfg.model.inference.compile)

    def predict(
        self, inputs: ImageInput | Sequence[ImageInput], batch_size: int | None = None, bgr: bool = False
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Detect objects in one image or a list of them.

        Args:
            inputs: one image or a list of them; an image is any of
                - a file path (str or os.PathLike): read with retinanet.data.image.read_image, EXIF
                  orientation applied, so boxes are in the frame viewers show;
                - a PIL image, taken as its pixels stand (no EXIF orientation applied; call
                  PIL.ImageOps.exif_transpose first to get the file's displayed frame);
                - a numpy array (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) gray: uint8, or float in 0..1;
                  (B, H, W, C) counts as a list;
                - a tensor (3, H, W) RGB, (4, H, W) RGBA, (1, H, W) or (H, W) gray: uint8, or float in
                  0..1; (B, C, H, W) counts as a list.
                Alpha is dropped; a float image with values far outside 0..1 (0..255, normalised)
                raises ValueError. Files are read a batch at a time.
            batch_size: images per forward pass (default: the detector's).
            bgr: the colour channels of arrays and tensors are in B, G, R order (OpenCV's
                cv2.imread); files and PIL images are always read as RGB.
        Returns:
            per image {"boxes": (D, 4) float xyxy pixels of that image, "scores": (D,), "labels": (D,)
            int64 0..K-1, "class_names": D names}, on the CPU, best first; a dict for a single input,
            a list for a list.
        Raises:
            FileNotFoundError: a path that does not exist.
            ValueError naming the input: an unreadable file, an array or tensor of another layout,
                dtype or value range. TypeError: an input of another type.
        """
        single = _is_single_image(inputs)
        items = [inputs] if single else list(inputs)
        batch_size = batch_size or self.batch_size
        outputs = []
        for start in range(0, len(items), batch_size):
            images = [
                as_image_tensor(item, bgr, "the input" if single else f"inputs[{start + offset}]")
                for offset, item in enumerate(items[start : start + batch_size])
            ]
            outputs.extend(self._forward(images))
        return outputs[0] if single else outputs

    @torch.inference_mode()
    def _forward(self, images: list[Tensor]) -> list[dict[str, Any]]:
        detections = self.model([image.to(self.device) for image in images])
        results = []
        for det in detections:
            det = {key: value.cpu() for key, value in det.items()}
            det["class_names"] = [self.class_names[label] for label in det["labels"].tolist()]
            results.append(det)
        return results


def compile_for_inference(model: RetinaNet, device: torch.device, backend: str | Callable | None = None) -> bool:
    """Compile the eval forward's fixed-shape part as one graph (backbone, FPN, head and candidate
    selection: RetinaNet.compile_inference) for low-latency inference where it pays.

    On a GPU: torch.compile(mode="reduce-overhead"), i.e. CUDA graphs: a batch-1 forward is hundreds
    of small kernels whose launches, not the arithmetic, set the latency; replayed as one graph they
    cost one launch. The input is padded as in eager inference (so the detections are eager's), and
    shapes are "automatic dynamic": the first input shape compiles a graph for that shape (what a
    camera's fixed frames get); a new shape recompiles once per dimension that changes (width,
    height, batch; a size of 1 is specialised), and each new shape after that only records its CUDA
    graph. Over 10 sizes at batch 1 and 3 that is 5 compiles, where static shapes compiled 8 times,
    reached dynamo's recompile limit and ran the rest eagerly. Resizing and NMS stay eager
    (data-dependent shapes). If compiling fails, the model logs it and runs eagerly. On the CPU the model stays eager unless a `backend` is forced (the
    tests use counting backends): inductor's C++ compile takes minutes there for little gain.

    Returns:
        whether the network was compiled; compilation itself happens at the first forward.
    """
    if device.type != "cuda" and backend is None:
        logger.info("compile: the low-latency path needs a GPU; running eagerly on %s", device)
        return False
    mode = "reduce-overhead" if device.type == "cuda" and backend in (None, "inductor") else None
    model.compile_inference(backend=backend or "inductor", mode=mode, dynamic=None)
    logger.info("compile: the network compiles at its first forward, and again for new input shapes "
                "until height, width and batch are dynamic (mode %s)", mode)
    return True


def _is_single_image(inputs: Any) -> bool:
    """Whether `inputs` of Detector.predict is one image, else a list of them: a 4-D array or tensor,
    or any other iterable than a path (something else is one image, refused by as_image_tensor)."""
    if isinstance(inputs, np.ndarray):
        return inputs.ndim <= 3
    if isinstance(inputs, Tensor):
        return inputs.dim() <= 3
    return isinstance(inputs, (str, bytes, os.PathLike, Image.Image)) or not isinstance(inputs, Iterable)


def as_image_tensor(item: ImageInput, bgr: bool = False, name: str = "the input") -> Tensor:
    """(3, H, W) RGB pixels the model takes (uint8, or float in 0..1) of one input of Detector.predict.

    Args:
        item: a path, a PIL image, an (H, W[, C]) numpy array or a ([C,] H, W) tensor; see
            Detector.predict.
        bgr: the channels of an array or tensor are B, G, R.
        name: how error messages call the input, e.g. "inputs[2]".
    """
    if isinstance(item, (str, os.PathLike)):
        return read_image(item)
    if isinstance(item, Image.Image):
        return pil_to_tensor_rgb(item)
    if isinstance(item, np.ndarray):
        if item.ndim == 3 and item.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"{name}: a numpy image must be (H, W, C) with C = 1, 3 or 4 (channels last, as OpenCV, PIL and "
                f"scikit-image give), got shape {item.shape}; for a (C, H, W) array pass torch.from_numpy(array)"
            )
        if item.ndim not in (2, 3):
            raise ValueError(f"{name}: a numpy image must be (H, W) or (H, W, C), got shape {item.shape}")
        # A copy where torch cannot share the memory: read-only (np.asarray of a PIL image) or
        # negative strides (array[..., ::-1]).
        tensor = torch.from_numpy(np.ascontiguousarray(item) if item.flags.writeable else item.copy())
        return _model_pixels(tensor.permute(2, 0, 1) if item.ndim == 3 else tensor, bgr, name)
    if isinstance(item, Tensor):
        return _model_pixels(item, bgr, name)
    raise TypeError(
        f"{name}: cannot read an image from a {type(item).__name__}; expected a file path, a PIL image, a numpy "
        "(H, W, C) array or a (C, H, W) tensor"
    )


def _model_pixels(image: Tensor, bgr: bool, name: str) -> Tensor:
    """A (C, H, W) or (H, W) uint8/float image tensor as (3, H, W) RGB: gray repeated, alpha dropped,
    B, G, R reordered when `bgr`; float values checked to be in 0..1."""
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected an image tensor (3, H, W), (4, H, W), (1, H, W) or (H, W), got shape "
            f"{tuple(image.shape)}; for channels last (H, W, C) use tensor.permute(2, 0, 1)"
        )
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{name}: the image has no pixels (shape {tuple(image.shape)})")
    if image.dtype.is_floating_point:
        image = _checked_float_pixels(image, name)
    elif image.dtype != torch.uint8:
        raise ValueError(f"{name}: expected a uint8 image or a float one in 0..1, got dtype {image.dtype}")
    if bgr and image.shape[0] >= 3:
        image = image[[2, 1, 0]]
    return image[:3] if image.shape[0] != 1 else image.expand(3, -1, -1)


def _checked_float_pixels(image: Tensor, name: str) -> Tensor:
    """A float image as float32, after checking that its values are in 0..1 (see FLOAT_RANGE_TOLERANCE)."""
    if image.numel():
        low, high = (value.item() for value in torch.aminmax(image))
        if high > 1 + FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"{name}: a float image must hold values in 0..1, got values up to {high:g}; for 0..255 pixels "
                "pass image / 255 or a uint8 image (else it gives no detection)"
            )
        if low < -FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"{name}: a float image must hold values in 0..1, got values down to {low:g}; pass the image "
                "before normalisation (the model normalises it)"
            )
    return image.float()


# ----------------------------------------------------------------------------------------------
# The `infer` command.


class InputImage(NamedTuple):
    """One image file of the infer command."""

    path: Path  # the file, as found
    relative: PurePath  # its path under the folder (or the fixed part of the glob) that found it; its name if named


def collect_images(inputs: Sequence[str | os.PathLike], recursive: bool = False) -> list[InputImage]:
    """Image files named by `inputs`: files, folders and glob patterns.

    A folder gives its files with an image suffix (IMAGE_SUFFIXES, any case), sorted by path, hidden
    ones (".name") left out; with `recursive`, those of its subfolders too (symlinked folders are
    followed, each real folder searched once). A glob (`**` matches subfolders) gives every file it
    matches; a file named itself is taken whatever its suffix. A file found twice is kept once,
    where it was first found.

    Raises:
        FileNotFoundError: an input that is neither a file, a folder nor a glob, or no image at all.
    """
    found: dict[Path, InputImage] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = _folder_images(path, recursive)
        elif path.is_file():
            images = [InputImage(path, PurePath(path.name))]
        elif _is_glob(str(item)):
            images = _glob_images(str(item))
        else:
            raise FileNotFoundError(f"input not found: {item} (expected an image file, a folder or a glob pattern)")
        for image in images:
            found.setdefault(image.path, image)
    if not found:
        raise FileNotFoundError(f"no image found in {[str(item) for item in inputs]}")
    return list(found.values())


def _folder_images(folder: Path, recursive: bool) -> list[InputImage]:
    """The images of `folder` (and, with `recursive`, of its subfolders, symlinked ones followed),
    each relative to `folder`. Each real folder is searched once, where it is met first: a folder
    reached again through a link (a link to an ancestor would loop forever) is skipped, and said so."""
    images, unsearched = [], 0
    searched: set[str] = set()  # real paths
    for root, subfolders, names in os.walk(folder, followlinks=recursive):
        real = os.path.realpath(root)
        if real in searched:
            logger.info("%s: not searched: it is %s (through a symlink), searched already", root, real)
            subfolders[:] = []
            continue
        searched.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in names:
            path = Path(root) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                images.append(InputImage(path, path.relative_to(folder)))
        if not recursive:
            unsearched = len(subfolders)
            break
    if unsearched:
        logger.info("%s: %d subfolders not searched (--recursive searches them)", folder, unsearched)
    if not images:
        logger.warning("%s: no image (%s) in this folder", folder, ", ".join(IMAGE_SUFFIXES))
    return sorted(images, key=lambda image: image.relative.parts)


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _glob_images(pattern: str) -> list[InputImage]:
    """The files a glob matches, each relative to the pattern's folders before the first wildcard."""
    parts = PurePath(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _is_glob(part):
            break
        fixed.append(part)
    base = PurePath(*fixed)
    images = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_file():
            relative = path.relative_to(base)
            # "a/*/../../x.jpg" matches outside the fixed folders: keep the name only, never ".." in an output path.
            images.append(InputImage(path, PurePath(path.name) if ".." in relative.parts else relative))
    if not images:
        logger.warning("%s: the pattern matches no file", pattern)
    return images


def drawn_name(relative: PurePath) -> PurePath:
    """The drawn copy's path under the output folder: the input's relative path; JPEG and PNG keep
    their suffix, any other format (WEBP, GIF, BMP, TIFF) is written as PNG."""
    return relative if relative.suffix.lower() in KEPT_SUFFIXES else relative.with_suffix(".png")


def drawn_image_paths(images: Sequence[InputImage], output_dir: Path) -> list[Path]:
    """Where the drawn copy of each input goes (output_dir / drawn_name), in input order, `<stem>_<n>`
    when an earlier input already took that path (compared ignoring case, as macOS and Windows do);
    fixed before any image is read, so a skipped image never changes another's name."""
    used: set[str] = set()
    paths = []
    for image in images:
        name = candidate = drawn_name(image.relative)
        number = 1
        while candidate.as_posix().lower() in used:
            candidate = name.with_name(f"{name.stem}_{number}{name.suffix}")
            number += 1
        used.add(candidate.as_posix().lower())
        paths.append(output_dir / candidate)
    return paths


def check_outputs_spare_inputs(
    files: Sequence[Path], outputs: Sequence[Path], output_dir: Path, searched_folders: Sequence[Path] = ()
) -> None:
    """Refuse an output folder where writing would replace the inputs or mix with them.

    Args:
        files: the input images.
        outputs: every file the command would write.
        output_dir: the output folder (need not exist yet).
        searched_folders: input folders searched recursively.
    Raises:
        ValueError naming the input: an output path that is an input file (real paths compared, so
        through symlinks too); an output folder that holds an input, at any depth (the drawn images
        would sit among the originals and be read as inputs by the next run on that folder); or one
        inside a folder searched recursively (the next run on it would read the drawn images).
    """
    real_out = os.path.realpath(output_dir)
    advice = f"choose another output folder, e.g. --output {real_out}_detections"
    input_by_real_path = {os.path.realpath(path): path for path in files}
    for output in outputs:
        overwritten = input_by_real_path.get(os.path.realpath(output))
        if overwritten is not None:
            raise ValueError(f"--output {output_dir}: writing {output} would overwrite the input image {overwritten}; {advice}")
    for path in files:
        folders = (os.path.realpath(path.parent), os.path.dirname(os.path.realpath(path)))  # link, target
        if any(_is_within(folder, real_out) for folder in folders):
            raise ValueError(
                f"--output {output_dir} holds the input image {path}: drawn images would be written among "
                f"(and could replace) the originals; {advice}"
            )
    for folder in searched_folders:
        if _is_within(real_out, os.path.realpath(folder)):
            raise ValueError(
                f"--output {output_dir} is inside {folder}, which is searched recursively: the next run on "
                f"{folder} would read the drawn images as inputs; choose an output folder outside it"
            )


def _is_within(path: str, folder: str) -> bool:
    """Whether real path `path` is `folder` or lies under it."""
    return os.path.commonpath([path, folder]) == folder


class InferCounts(NamedTuple):
    """What the infer command did: images processed (drawn and listed) and images skipped."""

    processed: int
    skipped: int


def infer_command(
    checkpoint: str,
    inputs: Sequence[str],
    output_dir: str,
    config_path: str | None = None,
    score_thresh: float | None = None,
    batch_size: int = 4,
    device: str | None = None,
    overrides: Sequence[str] = (),
    recursive: bool = False,
    compile: bool = False,
) -> InferCounts:
    """Detect objects in image files; write drawn images, detections.json and skipped.json.

    Every image is processed on its own: one that cannot be read, detected or drawn is logged with
    its file name and the reason, listed in skipped.json and skipped; the others are still written.

    Args:
        checkpoint: a trainer checkpoint.
        inputs: image files, folders and glob patterns (see collect_images).
        output_dir: a folder holding no input; receives a drawn copy of each image (boxes, class
            names and scores; see drawn_image_paths: the input's path under the folder that named
            it, JPEG and PNG keeping their format, others as PNG), detections.json: [{"file",
            "drawn" (the drawn copy's path in output_dir), "width", "height" (of the image as
            viewers show it, EXIF orientation applied), "detections": [{"box": [x1, y1, x2, y2]
            pixels, "score", "label", "class_name"}]}] of the processed images, in input order, and
            skipped.json: [{"file", "reason"}] of the others.
        config_path: a config replacing the checkpoint's (e.g. another test size).
        score_thresh: keep detections scoring above this; None: see infer_score_thresh.
        batch_size: images per forward pass; a batch whose forward fails is retried image by image.
        device: "cpu" or "cuda"; default CUDA when available.
        overrides: KEY=VALUE config overrides.
        recursive: search the subfolders of input folders too.
    Returns:
        how many images were processed and skipped.
    Raises:
        ValueError before anything is written, if an output would overwrite or sit among the inputs
        (see check_outputs_spare_inputs), if a file stands where the output folder (or one above
        it) should be, if two thresholds on the command line disagree, or if `device` cannot be
        used on this machine.
    """
    from .engine.distributed import check_device
    from .engine.run_dir import check_folder_path

    check_device(device, f"--device {device}")
    images = collect_images(inputs, recursive)
    files = [image.path for image in images]
    out = Path(output_dir)
    check_folder_path(out, "choose another --output folder")
    drawn_paths = drawn_image_paths(images, out)
    searched_folders = [Path(item) for item in inputs if recursive and Path(item).is_dir()]
    check_outputs_spare_inputs(files, [*drawn_paths, out / DETECTIONS_FILE, out / SKIPPED_FILE], out, searched_folders)
    thresh, thresh_source = infer_score_thresh(score_thresh, config_path, overrides)
    detector = Detector.from_checkpoint(checkpoint, device, thresh, config_path, batch_size, overrides, compile)
    logger.info("keeping detections scoring above %g (%s)", detector.model.postprocessor.score_thresh, thresh_source)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with tqdm(total=len(files), desc="infer", unit="img", disable=not sys.stderr.isatty()) as progress:
        for start in range(0, len(files), batch_size):
            batch = slice(start, start + batch_size)
            loaded = []  # (path, drawn_path, image) of the batch's readable images
            for path, drawn_path in zip(files[batch], drawn_paths[batch]):
                try:
                    loaded.append((path, drawn_path, read_image(path)))
                except (ValueError, OSError) as err:  # unreadable, or gone/unpermitted since it was listed
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
                records.append(_record(path, drawn_path.relative_to(out), image, result))
            progress.update(len(files[batch]))
    (out / DETECTIONS_FILE).write_text(json.dumps(records, indent=1))
    (out / SKIPPED_FILE).write_text(json.dumps(skipped, indent=1))
    if records:
        logger.info("%d images processed (%d skipped); results in %s", len(records), len(skipped), out)
    else:
        logger.error("no image could be processed: all %d skipped (reasons in %s)", len(skipped), out / SKIPPED_FILE)
    return InferCounts(len(records), len(skipped))


def infer_score_thresh(
    score_thresh: float | None, config_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[float | None, str]:
    """The threshold of the infer command, first found of:
    1. `score_thresh` (--score-thresh); it must agree with a model.inference.score_thresh=...
       override on the same line, and replaces the --config file's value (logged);
    2. a KEY=VALUE override model.inference.score_thresh=...;
    3. the --config file's model.inference.score_thresh, when it differs from the schema default
       (0.05, the evaluation threshold, which a config.yaml written by training lists like every key);
    4. INFER_SCORE_THRESH (0.3); the checkpoint's saved value is an evaluation threshold too.

    Returns:
        (the threshold for Detector.from_checkpoint, None meaning the config's own; where it comes
        from, for the log).
    Raises:
        ValueError: a threshold outside [0, 1), or --score-thresh and an override that disagree.
    """
    override_value = None
    for override in overrides:
        if override.split("=", 1)[0].strip() == SCORE_THRESH_KEY:
            override_value = parse_override(override)["model"]["inference"]["score_thresh"]
    file_value = None
    if config_path is not None:
        file_value = get_key(load_config(config_path), SCORE_THRESH_KEY)
        if file_value == get_key(Config(), SCORE_THRESH_KEY):
            file_value = None
    if score_thresh is not None:
        if not 0 <= score_thresh < 1:
            raise ValueError(f"--score-thresh must be in [0, 1) (a detection score), got {score_thresh:g}")
        if override_value is not None and override_value != score_thresh:
            raise ValueError(
                f"--score-thresh {score_thresh:g} and {SCORE_THRESH_KEY}={override_value} disagree; give one of them"
            )
        if file_value is not None:
            return score_thresh, f"--score-thresh, in place of {file_value:g} in {config_path}"
        return score_thresh, "--score-thresh"
    if override_value is not None:
        return None, f"{SCORE_THRESH_KEY}={override_value}"
    if file_value is not None:
        return None, f"{SCORE_THRESH_KEY} in {config_path}"
    return INFER_SCORE_THRESH, "infer's default; the config's model.inference.score_thresh is for evaluation"


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
    """Draw the detections on a copy of uint8 (3, H, W) `image`; save it as JPEG or PNG by `path`'s suffix."""
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw_detections_on(picture, detections)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        picture.save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        picture.save(path, format="PNG")


def _skip(skipped: list[dict[str, str]], path: Path, reason: Exception) -> None:
    logger.warning("skipping %s: %s", path, reason)
    skipped.append({"file": str(path), "reason": str(reason)})


def _record(path: Path, drawn: Path, image: Tensor, det: dict[str, Any]) -> dict[str, Any]:
    detections = [
        {"box": box, "score": score, "label": label, "class_name": name}
        for box, score, label, name in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), det["class_names"]
        )
    ]
    return {"file": str(path), "drawn": drawn.as_posix(), "width": image.shape[-1], "height": image.shape[-2],
            "detections": detections}
