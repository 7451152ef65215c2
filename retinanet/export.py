"""Export a checkpoint to ONNX or TorchScript as one self-contained graph: image in, detections out.

The exported model takes ONE image of the size fixed at export time and returns its detections:

    input   image   float32 (3, H, W), RGB in 0..1, (H, W) = the export's image_size
    outputs boxes   float32 (D, 4) xyxy in pixels of that input image
            scores  float32 (D,), best first, all > model.inference.score_thresh
            labels  int64 (D,) in 0..K-1 (class names are stored in the file's metadata)
    with D <= model.inference.detections_per_image.

Everything the eager model does happens inside the graph: normalisation, resizing to the configured
test size (min_size_test / max_size_test), zero-padding to size_divisibility, the network, per-level
top-k, threshold, decoding, clipping, class-aware NMS and detections_per_image. The input size is
fixed because resizing, padding and the anchors are computed for it at export time (they become
constants); feed images of another size after resizing them to image_size yourself. Both files refuse
an image of another shape: the TorchScript graph raises an error naming the expected and received
shapes, ONNX runtimes reject the input against its declared shape.

ONNX uses the TorchScript-based exporter (torch.onnx.export(dynamo=False)), opset 17; NMS becomes
ONNX NonMaxSuppression through torchvision's symbolic. TorchScript is a torch.jit.trace; loading it
needs `import torchvision` first (it registers the torchvision::nms operator). Metadata (class names,
image size, thresholds) is in the ONNX file's metadata_props and the TorchScript file's extra file
"metadata.json".
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from .checkpoint import load_model
from .modeling import RetinaNet
from .modeling.preprocess import resize_scale, resized_size

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]


def check_image_shape(image: Tensor, expected: list[int]) -> Tensor:
    """`image` itself if its shape is `expected` ([3, H, W]); else ValueError naming both shapes.

    Run as TorchScript (`_scripted_shape_check`) so that the check survives torch.jit.trace: a traced
    Python `if` is frozen at the example's shape, and a reshape to the constant shape still passes
    an image of another shape with as many pixels (a (3, 150, 200) into a (3, 200, 150) export).
    """
    if list(image.shape) != expected:
        received = ", ".join([str(side) for side in image.shape])
        raise ValueError(
            f"this model was exported for images of shape ({expected[0]}, {expected[1]}, {expected[2]}), "
            f"got ({received}); resize the image to {expected[1]}x{expected[2]} (HxW) first, or export "
            "again with --image-size H W of your images"
        )
    return image


@functools.cache
def _scripted_shape_check() -> torch.jit.ScriptFunction:
    """check_image_shape compiled once; a traced graph calls it with its control flow intact."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit\..* is deprecated", FutureWarning)
        return torch.jit.script(check_image_shape)


class SingleImageDetector(nn.Module):
    """RetinaNet with its pre- and post-processing, for one image of a fixed size (see the module
    docstring for the inputs and outputs); traceable, with no data-dependent Python branch.

    Args:
        model: the RetinaNet (its weights are shared, not copied).
        image_size: (H, W) of the images the exported graph takes.
    """

    def __init__(self, model: RetinaNet, image_size: tuple[int, int]):
        super().__init__()
        self.model = model.eval()
        pre = model.preprocessor
        height, width = image_size
        # The eager preprocessor's arithmetic: Preprocessor._resize interpolates to floor(side * scale)
        # (recompute_scale_factor=True) and at least 1 px, which is what size= below asks for.
        scale = resize_scale(height, width, pre.min_size_test, pre.max_size_test)
        self.resized_size = (height, width) if scale == 1.0 else resized_size(height, width, scale)
        stride = pre.size_divisibility
        self.padded_size = tuple(math.ceil(side / stride) * stride for side in self.resized_size)
        self.image_size = (height, width)
        resized_h, resized_w = (torch.tensor(side, dtype=torch.float32) for side in self.resized_size)
        ratio_h, ratio_w = torch.tensor(float(height)) / resized_h, torch.tensor(float(width)) / resized_w
        self.register_buffer("box_scale", torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]), persistent=False)
        self.register_buffer("resized_size_tensor", torch.tensor([self.resized_size]), persistent=False)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(3, H, W) float 0..1 -> boxes (D, 4) xyxy input pixels, scores (D,), labels (D,) int64."""
        pre, post = self.model.preprocessor, self.model.postprocessor
        if not torch.onnx.is_in_onnx_export():  # ONNX declares the input's shape; runtimes check it
            image = _scripted_shape_check()(image, [3, *self.image_size])
        image = (image.float() - pre.pixel_mean) / pre.pixel_std
        if self.resized_size != self.image_size:
            image = F.interpolate(image[None], size=self.resized_size, mode="bilinear", align_corners=False)[0]
        pad_bottom = self.padded_size[0] - self.resized_size[0]
        pad_right = self.padded_size[1] - self.resized_size[1]
        batch = F.pad(image, (0, pad_right, 0, pad_bottom))[None]
        cls_per_level, box_per_level, anchors_per_level = self.model.forward_batch(batch)
        boxes, scores, labels = post.candidates(
            cls_per_level, box_per_level, anchors_per_level, self.resized_size_tensor
        )
        boxes, scores, labels = boxes[0], scores[0], labels[0]
        keep = scores > post.score_thresh
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # Class-aware NMS by shifting each class to its own region, as torchvision's batched_nms does
        # (same offsets: max coordinate + 1); the appended 0 keeps max() defined with no candidate.
        max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
        offsets = labels.to(boxes.dtype) * (max_coordinate + 1)
        kept = nms(boxes + offsets[:, None], scores, post.nms_thresh)[: post.detections_per_image]
        return boxes[kept] * self.box_scale, scores[kept], labels[kept]


def metadata(model: RetinaNet, image_size: tuple[int, int]) -> dict[str, Any]:
    """What a user of the exported file needs besides the graph."""
    post = model.postprocessor
    return {
        "class_names": list(model.class_names),
        "image_size": list(image_size),
        "input": "image: float32 (3, H, W) RGB in 0..1, (H, W) = image_size",
        "outputs": "boxes: float32 (D, 4) xyxy input pixels; scores: float32 (D,); labels: int64 (D,)",
        "score_thresh": post.score_thresh,
        "nms_thresh": post.nms_thresh,
        "detections_per_image": post.detections_per_image,
    }


def export_model(
    checkpoint: str | os.PathLike | dict,
    fmt: str,
    out_path: str | os.PathLike,
    image_size: tuple[int, int] | list[int] | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Export a checkpoint's model (see the module docstring for what the file takes and returns).

    Args:
        checkpoint: a trainer checkpoint (path or loaded dict); its config and class names define
            the model.
        fmt: "onnx" or "torchscript".
        out_path: the file to write.
        image_size: (H, W) of the exported model's input; default: square of model.input.min_size_test.
        overrides: KEY=VALUE config overrides (e.g. model.inference.score_thresh=0.3).
    Returns:
        out_path.
    """
    return _export(checkpoint, fmt, out_path, image_size, overrides)[0]


def _export(
    checkpoint: str | os.PathLike | dict, fmt: str, out_path: str | os.PathLike,
    image_size: tuple[int, int] | list[int] | None, overrides: Sequence[str] = (),
) -> tuple[Path, dict[str, Any]]:
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ValueError("ONNX export needs the onnx package: pip install 'retinanet[onnx]' (or onnx onnxruntime)")
    model, cfg = load_model(checkpoint, overrides=overrides)
    if image_size is None:
        image_size = (cfg.model.input.min_size_test, cfg.model.input.min_size_test)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (height, width) in pixels, got {image_size}")
    image_size = (int(image_size[0]), int(image_size[1]))
    wrapper = SingleImageDetector(model, image_size).eval()
    example = torch.rand(3, *image_size, generator=torch.Generator().manual_seed(0))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(model, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about Python values (sizes, thresholds) becoming constants: intended here.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.jit is deprecated but remains the route to a TorchScript file and to the ONNX
        # exporter that has torchvision's NMS symbolic.
        warnings.filterwarnings("ignore", r".*torch\.jit\..* is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        if fmt == "onnx":
            _export_onnx(wrapper, example, out_path, meta)
        else:
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            torch.jit.save(traced, str(out_path), _extra_files={"metadata.json": json.dumps(meta)})
    return out_path, meta


def _export_onnx(wrapper: SingleImageDetector, example: Tensor, out_path: Path, meta: dict[str, Any]) -> None:
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(
        wrapper, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
        input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
        dynamic_axes={name: {0: "num_detections"} for name in OUTPUT_NAMES},
    )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))


def export_command(
    checkpoint: str, fmt: str, out_path: str, image_size: tuple[int, int] | list[int] | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """The `export` command: export_model, then log what the file takes and returns."""
    path, meta = _export(checkpoint, fmt, out_path, image_size, overrides)
    height, width = meta["image_size"]
    logger.info(
        "wrote %s (%s, %.1f MB): takes image float32 (3, %d, %d) RGB 0..1, returns boxes (D, 4) xyxy pixels, "
        "scores (D,), labels (D,) over %d classes, D <= %d",
        path, fmt, path.stat().st_size / 2**20, height, width, len(meta["class_names"]), meta["detections_per_image"],
    )
    return path
