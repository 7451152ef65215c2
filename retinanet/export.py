"""Export a checkpoint to ONNX or TorchScript as one self-contained graph: a batch of images of any
size in, detections out.

    input   images          (B, 3, H, W) RGB: float32 in 0..1 (the default) or uint8 in 0..255 (export
                            with input_dtype="uint8", CLI --input-dtype uint8); a file takes the one
                            dtype it was exported for. Any B >= 1 and H, W >= 1, but one H, W for the
                            whole batch: images of different sizes go in separate calls.
    outputs boxes           float32 (B, D, 4) xyxy in pixels of the input images
            scores          float32 (B, D), best first
            labels          int64 (B, D) in 0..K-1 (class names are in the file's metadata)
            num_detections  int64 (B,): image i's detections are rows 0..num_detections[i]-1 of its
                            boxes, scores and labels; the rows after them are padding (boxes 0,
                            scores 0, labels -1)
    with D = model.inference.detections_per_image: the padded layout of TensorRT's EfficientNMS.

Everything the eager model does happens inside the graph, for the size of the input it is given:
casting (uint8 / 255), normalisation, resizing to the configured test size (min_size_test /
max_size_test: each side floor(side * scale) px, at least 1, with the scale and sizes computed in
float64 like the eager Preprocessor's Python floats; PyTorch's bilinear sampling written as gathers,
`bilinear_resize`, so that no runtime's own Resize arithmetic comes in), zero-padding to
size_divisibility, the network, anchors for the feature maps' sizes, per-level top-k, threshold,
decoding, clipping, class-aware NMS per image, detections_per_image and scaling the boxes back to the
input's pixels. The detections equal the eager model's (`model(list_of_images)` in eval mode) to
1e-3 px and 1e-4 in score (tests/test_export.py: several sizes, both resize branches, batches,
uint8, a 2x600 strip).

How the sizes stay dynamic: a traced Python int is frozen at the example's value, so every size is
read with torch._shape_as_tensor and computed with tensor ops, as torchvision's detection transform
does under tracing; the anchors are built from the feature maps' traced sizes (`grid_anchors`).
PostProcessor.candidates sizes each level's top-k as min(topk_candidates, anchors of the level), a
Python min that tracing would freeze: every level gets topk_candidates padding anchors that never
score (`pad_levels_for_topk`), so the min is topk_candidates at every size and the candidates above
the threshold are the eager model's.

NMS is one call for the whole batch, each (image, class) shifted to its own region (the coordinate
trick of torchvision's batched_nms) in float64, which keeps the shifted coordinates exact: the
TorchScript file's NMS decisions are the eager ones. ONNX NonMaxSuppression takes float32 only, so in
the ONNX file the shifted coordinates are rounded to float32 (an error of about 1e-7 * B * K *
max_size_test px): a pair whose IoU is that close to nms_thresh may be decided the other way, as
in torchvision's own ONNX exports.

The TorchScript file refuses an input that is not (B, 3, H, W) of its dtype with a ValueError that
says what to do (a scripted check kept inside the trace); ONNX runtimes check the declared rank,
channel count and dtype.

ONNX uses the TorchScript-based exporter (torch.onnx.export(dynamo=False)), opset 17; NMS becomes
ONNX NonMaxSuppression through torchvision's symbolic. TorchScript is a torch.jit.trace on the CPU
(its devices are constants: run it on the CPU); loading it needs `import torchvision` first (it
registers the torchvision::nms operator), and its first calls at a new input shape are slower while
TorchScript's profiling executor specialises the graph. Metadata (class names, input and outputs,
thresholds, test sizes) is in the ONNX file's metadata_props and the TorchScript file's extra file
"metadata.json".
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_model
from .modeling import RetinaNet
from .modeling.anchors import shifted_anchors
from .modeling.postprocess import class_aware_nms

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
INPUT_DTYPES = ("float32", "uint8")
ONNX_OPSET = 17
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]
# The example traced when no size is given: a photo's 3:4. Any size traces the same graph.
EXAMPLE_IMAGE_SIZE = (480, 640)
# The label of a padding row (no detection): never a class index.
NO_LABEL = -1


def check_images(images: Tensor, uint8: bool) -> Tensor:
    """`images` itself if it is a non-empty (B, 3, H, W) batch of the export's dtype; else ValueError
    saying what to do.

    Run as TorchScript (`_scripted_images_check`) so that the check survives torch.jit.trace: a traced
    Python `if` is frozen at the example's outcome.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        received = ", ".join([str(side) for side in images.shape])
        raise ValueError(
            f"this model takes a batch of RGB images of shape (B, 3, H, W), got ({received}); "
            "give one image (3, H, W) as image[None], and a grey image as image.expand(3, H, W)"
        )
    if images.shape[0] < 1 or images.shape[2] < 1 or images.shape[3] < 1:
        received = ", ".join([str(side) for side in images.shape])
        raise ValueError(f"this model needs at least one image of at least 1x1 pixels, got shape ({received})")
    if uint8 and images.dtype != torch.uint8:
        raise ValueError(
            "this model was exported for uint8 images in 0..255; convert float images in 0..1 with "
            "(images * 255).round().to(torch.uint8), or export again with --input-dtype float32"
        )
    if not uint8 and not images.is_floating_point():
        raise ValueError(
            "this model was exported for float images in 0..1; convert uint8 images with images.float() / 255, "
            "or export again with --input-dtype uint8"
        )
    return images


@functools.cache
def _scripted_images_check() -> torch.jit.ScriptFunction:
    """check_images compiled once; a traced graph calls it with its control flow intact."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit\..* is deprecated", FutureWarning)
        return torch.jit.script(check_images)


def resized_size(height: Tensor, width: Tensor, min_size: int, max_size: int) -> tuple[Tensor, Tensor]:
    """The eager Preprocessor's resized (h, w), as tensor ops that stay dynamic under tracing.

    scale = min(min_size / min(H, W), max_size / max(H, W)) and each side floor(side * scale), at
    least 1 px (modeling.preprocess.resize_scale and resized_size), in float64 like their Python
    floats, rounding included: with min_size 128, eager resizes 41x41 to 128x128 but 49x49 to 127x127
    (49 * (128 / 49) = 127.99999999999999); float32 would give 127 and 128.

    Args:
        height, width: 0-dim int64 tensors, the input's size in px.
    Returns:
        (h, w) 0-dim int64 tensors.
    """
    height_f, width_f = height.to(torch.float64), width.to(torch.float64)
    min_size_t = torch.tensor(float(min_size), dtype=torch.float64)
    max_size_t = torch.tensor(float(max_size), dtype=torch.float64)
    scale = torch.minimum(min_size_t / torch.minimum(height_f, width_f), max_size_t / torch.maximum(height_f, width_f))
    one = torch.tensor(1, dtype=torch.int64)
    resized_h = torch.maximum(torch.floor(height_f * scale).to(torch.int64), one)
    resized_w = torch.maximum(torch.floor(width_f * scale).to(torch.int64), one)
    return resized_h, resized_w


def bilinear_resize(images: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False) as gathers
    and products, equal to it to about 1 ulp.

    The ONNX Resize of runtimes computes its source coordinates from out/in instead of PyTorch's in/out
    (onnxruntime: 5e-5 of the pixel range on noise, 1e-4 on scores), and some runtimes treat a 1 px
    output differently ("pytorch_half_pixel"); plain Gather, Mul and Add give PyTorch's values on any
    runtime.

    Args:
        images: (B, C, H, W) float32.
        height, width: 0-dim int64 tensors, the output size in px (at least 1).
    Returns:
        (B, C, height, width), interpolated along W first, then H, as PyTorch's CPU kernel does.
    """
    shape = torch._shape_as_tensor(images)
    index0, index1, weight0, weight1 = _bilinear_source(shape[3], width, images.device)
    columns = images.index_select(3, index0) * weight0 + images.index_select(3, index1) * weight1
    index0, index1, weight0, weight1 = _bilinear_source(shape[2], height, images.device)
    return columns.index_select(2, index0) * weight0[:, None] + columns.index_select(2, index1) * weight1[:, None]


def _bilinear_source(in_size: Tensor, out_size: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Along one axis, each output pixel's two source pixels and their weights, in float32 as aten's
    area_pixel_compute_source_index and guard_index_and_lambda compute them (align_corners=False):
    source = (in / out) * (i + 0.5) - 0.5, clamped at 0; the second pixel is the first at the border.

    Returns:
        index0, index1: (out,) int64; weight0, weight1: (out,) float32, summing to 1.
    """
    ratio = in_size.to(torch.float32) / out_size.to(torch.float32)
    source = (ratio * (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    last = in_size - 1
    index0 = torch.minimum(source.floor().to(torch.int64), last)
    weight1 = (source - index0.to(torch.float32)).clamp(0, 1)
    index1 = index0 + (index0 < last).to(torch.int64)
    return index0, index1, 1 - weight1, weight1


def grid_anchors(cell_anchors: Tensor, stride: int, feature: Tensor) -> Tensor:
    """AnchorGenerator's anchors of one level for the feature map's traced size (its cache is keyed
    by Python ints, which tracing would freeze); the same function, so the same values.

    Args:
        cell_anchors: (A, 4) xyxy anchors of one location; stride: px; feature: (B, C, H_l, W_l).
    Returns:
        (H_l * W_l * A, 4) xyxy px of the padded image.
    """
    shape = torch._shape_as_tensor(feature)
    return shifted_anchors(cell_anchors, stride, shape[2], shape[3])


def pad_levels_for_topk(
    cls_per_level: list[Tensor], box_per_level: list[Tensor], anchors_per_level: list[Tensor], num_padding: int
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Append num_padding anchors that never score to every level: logits -inf (score 0), deltas 0
    and anchors (0, 0, 0, 0), which decode to an empty box that MIN_BOX_SIZE drops as well.

    With num_padding = topk_candidates, PostProcessor.candidates's min(topk_candidates, A_l) is
    topk_candidates at every image size, so tracing can freeze it; the padding sorts last, so the
    candidates that pass the score threshold are those of the unpadded levels.

    Args:
        per level (B, A_l, K) logits, (B, A_l, 4) deltas and (A_l, 4) xyxy anchors.
    Returns:
        the same with A_l + num_padding anchors per level.
    """
    cls_per_level = [F.pad(logits, (0, 0, 0, num_padding), value=float("-inf")) for logits in cls_per_level]
    box_per_level = [F.pad(deltas, (0, 0, 0, num_padding)) for deltas in box_per_level]
    anchors_per_level = [F.pad(anchors, (0, 0, 0, num_padding)) for anchors in anchors_per_level]
    return cls_per_level, box_per_level, anchors_per_level


def first_per_image(image_index: Tensor, batch_size: Tensor, detections_per_image: int) -> tuple[Tensor, Tensor]:
    """Where each image's first D detections sit in a list, with fixed shapes (no Python loop over
    images, which tracing would unroll for the example's batch size).

    Args:
        image_index: (M,) int64 image of each detection, the list in decreasing score order.
        batch_size: B, a 0-dim int64 tensor.
        detections_per_image: D.
    Returns:
        position: (B, D) int64 index into the list of image b's d-th detection; M where image b has
            fewer than d + 1 detections (a padding row appended by the caller).
        count: (B,) int64 detections of each image, at most D.
    """
    num_kept = torch._shape_as_tensor(image_index)[0]
    # D entries of image -1 (none) make every row of `key` at least D long: topk(D) is always defined.
    padded_index = F.pad(image_index, (0, detections_per_image), value=-1)
    member = padded_index[None, :] == torch.arange(batch_size, device=image_index.device)[:, None]  # (B, M + D)
    rank = member.to(torch.int64).cumsum(1) - 1  # order within the image, the list's order kept
    key = torch.where(member, rank, torch.full_like(rank, detections_per_image))
    smallest, position = key.topk(detections_per_image, dim=1, largest=False)
    valid = smallest < detections_per_image
    return torch.where(valid, position, num_kept), valid.to(torch.int64).sum(1)


class BatchDetector(nn.Module):
    """RetinaNet with its pre- and post-processing for a (B, 3, H, W) batch of any size (see the
    module docstring for the inputs and outputs); traceable, with no size frozen by tracing.

    Args:
        model: the RetinaNet (its weights are shared, not copied).
        input_dtype: "float32" (images in 0..1) or "uint8" (0..255).
    """

    def __init__(self, model: RetinaNet, input_dtype: str = "float32"):
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input dtype must be one of {list(INPUT_DTYPES)}, got {input_dtype!r}")
        self.model = model.eval()
        self.input_dtype = input_dtype

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, 3, H, W) -> boxes (B, D, 4) xyxy input px, scores (B, D), labels (B, D), num_detections (B,)."""
        if not torch.onnx.is_in_onnx_export():  # ONNX declares the input's rank, channels and dtype
            images = _scripted_images_check()(images, self.input_dtype == "uint8")
        shape = torch._shape_as_tensor(images)
        batch_size, height, width = shape[0], shape[2], shape[3]
        batch, resized_h, resized_w = self._preprocess(images, height, width)
        boxes, scores, labels = self._candidates(batch, batch_size, resized_h, resized_w)
        boxes, scores, labels, num_detections = self._detections(boxes, scores, labels, batch_size)
        # Back to the input's pixels by float32 ratios, as Preprocessor.restore does.
        ratio_w = width.to(torch.float32) / resized_w.to(torch.float32)
        ratio_h = height.to(torch.float32) / resized_h.to(torch.float32)
        return boxes * torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]), scores, labels, num_detections

    def _preprocess(self, images: Tensor, height: Tensor, width: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, H, W) -> normalised (B, 3, H', W') resized and zero-padded to size_divisibility, and
        the resized (h, w) inside it; the eager Preprocessor's operations in its order."""
        pre = self.model.preprocessor
        images = images.float() / 255 if self.input_dtype == "uint8" else images.float()
        images = (images - pre.pixel_mean) / pre.pixel_std
        resized_h, resized_w = resized_size(height, width, pre.min_size_test, pre.max_size_test)
        # Resizing to the input's own size (scale 1, which eager skips) takes each pixel with weight 1
        # and its neighbour with weight 0: the same values.
        images = bilinear_resize(images, resized_h, resized_w)
        stride = pre.size_divisibility
        pad_bottom = (resized_h + stride - 1) // stride * stride - resized_h
        pad_right = (resized_w + stride - 1) // stride * stride - resized_w
        return F.pad(images, [0, pad_right, 0, pad_bottom]), resized_h, resized_w

    def _candidates(
        self, batch: Tensor, batch_size: Tensor, resized_h: Tensor, resized_w: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The network and PostProcessor.candidates: (B, N, 4) xyxy px of the resized image, (B, N)
        scores (0 where rejected), (B, N) labels."""
        model, post = self.model, self.model.postprocessor
        features = model.fpn(model.backbone(batch))
        cls_per_level, box_per_level = model.head(features)
        generator = model.anchor_generator
        anchors_per_level = [
            grid_anchors(getattr(generator, f"cell_anchors_{level}"), stride, feature)
            for level, (stride, feature) in enumerate(zip(generator.strides, features))
        ]
        levels = pad_levels_for_topk(cls_per_level, box_per_level, anchors_per_level, post.topk_candidates)
        image_sizes = torch.stack([resized_h, resized_w])[None].expand(batch_size, 2)
        return post.candidates(*levels, image_sizes)

    def _detections(
        self, boxes: Tensor, scores: Tensor, labels: Tensor, batch_size: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Threshold, class-aware NMS per image and the first D of each image, padded: (B, N, ...)
        candidates -> (B, D, 4), (B, D), (B, D), (B,) counts."""
        post = self.model.postprocessor
        image_index = torch.arange(batch_size, device=labels.device)[:, None].expand_as(labels)
        keep = scores > post.score_thresh
        boxes, scores, labels, image_index = boxes[keep], scores[keep], labels[keep], image_index[keep]
        kept = class_aware_nms(boxes, scores, image_index * self.model.num_classes + labels, post.nms_thresh)
        position, num_detections = first_per_image(image_index[kept], batch_size, post.detections_per_image)
        # One padding row after the kept detections, where `position` points for an empty slot.
        boxes = F.pad(boxes[kept], (0, 0, 0, 1))
        scores = F.pad(scores[kept], (0, 1))
        labels = F.pad(labels[kept], (0, 1), value=NO_LABEL)
        return boxes[position], scores[position], labels[position], num_detections


def metadata(model: RetinaNet, input_dtype: str, example_image_size: tuple[int, int]) -> dict[str, Any]:
    """What a user of the exported file needs besides the graph."""
    post, pre = model.postprocessor, model.preprocessor
    value_range = "0..255" if input_dtype == "uint8" else "0..1"
    return {
        "class_names": list(model.class_names),
        "input": f"images: {input_dtype} (B, 3, H, W) RGB in {value_range}; dynamic input (B, 3, H, W): "
                 "any B, H, W, one H, W per call",
        "input_dtype": input_dtype,
        "outputs": "boxes: float32 (B, D, 4) xyxy input pixels; scores: float32 (B, D); labels: int64 (B, D); "
                   "num_detections: int64 (B,), the rows after an image's num_detections are padding "
                   f"(scores 0, labels {NO_LABEL})",
        "min_size_test": pre.min_size_test,
        "max_size_test": pre.max_size_test,
        "example_image_size": list(example_image_size),
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
    input_dtype: str = "float32",
) -> Path:
    """Export a checkpoint's model (see the module docstring for what the file takes and returns).

    Args:
        checkpoint: a trainer checkpoint (path or loaded dict); its config and class names define
            the model.
        fmt: "onnx" or "torchscript".
        out_path: the file to write.
        image_size: (H, W) of the example traced (default EXAMPLE_IMAGE_SIZE); the file takes any size.
        overrides: KEY=VALUE config overrides (e.g. model.inference.score_thresh=0.3).
        input_dtype: "float32" (images in 0..1) or "uint8" (0..255), the dtype the file takes.
    Returns:
        out_path.
    """
    return _export(checkpoint, fmt, out_path, image_size, overrides, input_dtype)[0]


def _export(
    checkpoint: str | os.PathLike | dict, fmt: str, out_path: str | os.PathLike,
    image_size: tuple[int, int] | list[int] | None, overrides: Sequence[str] = (), input_dtype: str = "float32",
) -> tuple[Path, dict[str, Any]]:
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {list(FORMATS)}, got {fmt!r}")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"export input dtype must be one of {list(INPUT_DTYPES)}, got {input_dtype!r}")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ValueError("ONNX export needs the onnx package: pip install 'retinanet[onnx]' (or onnx onnxruntime)")
    image_size = EXAMPLE_IMAGE_SIZE if image_size is None else image_size
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (height, width) in pixels, got {image_size}")
    image_size = (int(image_size[0]), int(image_size[1]))
    out_path = Path(out_path)
    _check_out_path(out_path, fmt)  # before the trace, which takes a while
    model, _ = load_model(checkpoint, overrides=overrides)
    wrapper = BatchDetector(model, input_dtype).eval()
    example = _example_batch(image_size, input_dtype)
    meta = metadata(model, input_dtype, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about Python values (thresholds, D) becoming constants: intended here.
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


def _check_out_path(out_path: Path, fmt: str) -> None:
    """Create the folder of the file to write, refusing a path where no file can be written.

    Raises:
        ValueError naming the path: it is a folder, or a file stands where a folder above it should be.
        PermissionError: the folder cannot be written.
    """
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    if out_path.is_dir():
        raise ValueError(f"{out_path} is a folder; give the file to write, e.g. {out_path / ('model' + suffix)}")
    for folder in out_path.parents:
        if folder.is_dir():
            break
        if folder.exists() or folder.is_symlink():
            raise ValueError(f"{out_path}: {folder} is a file, not a folder; choose another output path")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out_path.parent, os.W_OK):
        raise PermissionError(f"{out_path.parent}: cannot write {out_path.name} there (permission denied)")


def _example_batch(image_size: tuple[int, int], input_dtype: str) -> Tensor:
    """(2, 3, H, W) noise: two images, so that nothing of a batch of one is frozen into the trace."""
    images = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(0))
    return (images * 255).round().to(torch.uint8) if input_dtype == "uint8" else images


def _export_onnx(wrapper: BatchDetector, example: Tensor, out_path: Path, meta: dict[str, Any]) -> None:
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(
        wrapper, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
        input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
    )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))


def export_command(
    checkpoint: str, fmt: str, out_path: str, image_size: tuple[int, int] | list[int] | None = None,
    overrides: Sequence[str] = (), input_dtype: str = "float32",
) -> Path:
    """The `export` command: export_model, then log what the file takes and returns."""
    path, meta = _export(checkpoint, fmt, out_path, image_size, overrides, input_dtype)
    value_range = "0..255" if input_dtype == "uint8" else "0..1"
    logger.info(
        "wrote %s (%s, %.1f MB): takes images %s (B, 3, H, W) RGB %s of any size (one size per call), returns "
        "boxes (B, D, 4) xyxy pixels, scores (B, D), labels (B, D) over %d classes and num_detections (B,), "
        "D = %d",
        path, fmt, path.stat().st_size / 2**20, input_dtype, value_range, len(meta["class_names"]),
        meta["detections_per_image"],
    )
    return path
