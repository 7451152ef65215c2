"""The RetinaNet detector: preprocessor, backbone, FPN, head, anchors, criterion and post-processing."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .anchors import AnchorGenerator, feature_grid_sizes
from .backbone import ResNetBackbone
from .box_coder import BoxCoder
from .fpn import FPN
from .head import RetinaNetHead
from .losses import RetinaNetLoss
from .matcher import Matcher
from .postprocess import PostProcessor
from .preprocess import Preprocessor

STRIDES = [8, 16, 32, 64, 128]  # P3..P7

logger = logging.getLogger(__name__)


class RetinaNet(nn.Module):
    """Single-stage detector with torchvision's detection calling convention.

    - training: ``model(images, targets) -> {"loss_cls": ..., "loss_box": ...}``
    - eval: ``model(images) -> [{"boxes": (D, 4) xyxy pixels of the input image, "scores": (D,),
      "labels": (D,) int64 in 0..K-1}, ...]``

    images: list of (3, H, W) RGB tensors, float in 0..1 (or uint8). targets: list of
    {"boxes": (N, 4) float xyxy absolute pixels, "labels": (N,) int64 in 0..K-1, optional
    "crowd_boxes": (C, 4) regions whose anchors are ignored}.
    """

    def __init__(
        self,
        preprocessor: Preprocessor,
        backbone: ResNetBackbone,
        fpn: FPN,
        head: RetinaNetHead,
        anchor_generator: AnchorGenerator,
        criterion: RetinaNetLoss,
        postprocessor: PostProcessor,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        self.preprocessor = preprocessor
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.anchor_generator = anchor_generator
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.num_classes = head.num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        # compile_inference's compiled _inference_candidates, and whether any compiled code runs
        # (compile_network's or compile_inference's).
        self._compiled_inference: Callable | None = None
        self.network_compiled = False

    def forward_batch(self, batch: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Network on an already preprocessed (B, 3, H, W) batch.

        Returns per level: (B, A_l, K) logits, (B, A_l, 4) deltas and (A_l, 4) anchors.
        """
        # compile_network compiles the modules in place: self._network runs them compiled
        features, cls_per_level, box_per_level = self._with_eager_fallback(self._network, self._network, batch)
        grid_sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        anchors = self.anchor_generator(grid_sizes)
        anchors_per_level = list(anchors.split(self.anchor_generator.num_anchors(grid_sizes)))
        return cls_per_level, box_per_level, anchors_per_level

    def _network(self, batch: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Backbone, FPN and head: per level the (B, C, H_l, W_l) features, (B, A_l, K) logits and
        (B, A_l, 4) deltas."""
        features = self.fpn(self.backbone(batch))
        cls_per_level, box_per_level = self.head(features)
        return features, cls_per_level, box_per_level

    def _inference_candidates(
        self, batch: Tensor, anchors_per_level: list[Tensor], image_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Network and the fixed-shape candidate selection (PostProcessor.candidates): what
        compile_inference compiles as one graph. Returns boxes (B, N, 4), scores (B, N), labels (B, N)."""
        _, cls_per_level, box_per_level = self._network(batch)
        return self.postprocessor.candidates(cls_per_level, box_per_level, anchors_per_level, image_sizes)

    def _with_eager_fallback(self, function: Callable, eager_function: Callable, *args):
        """function(*args); if it fails while the model is compiled (compiling happens at the first
        call of a new input shape): logged, the model uncompiled, and eager_function(*args) instead."""
        try:
            return function(*args)
        except Exception as err:
            if not self.network_compiled:
                raise
            logger.warning("torch.compile failed (%s: %s); running eagerly", type(err).__name__, err)
            self.uncompile_network()
            return eager_function(*args)

    def compile_network(self, **compile_kwargs) -> None:
        """torch.compile the backbone, FPN and head in place (nn.Module.compile: state-dict keys do not
        change), each on its own, for training (train.compile): under DDP the head's gradients reduce
        while the FPN and backbone still run backward. Pre-processing, the criterion and
        post-processing stay eager: their loops over images and data-dependent shapes would only break
        graphs and recompile. If compiling fails, the model logs it and runs eagerly.

        compile_kwargs: torch.compile's (backend, mode, dynamic, ...).
        """
        self.uncompile_network()
        for module in (self.backbone, self.fpn, self.head):
            module.compile(**compile_kwargs)
        self.network_compiled = True

    def compile_inference(self, **compile_kwargs) -> None:
        """torch.compile the eval forward's fixed-shape part as one graph: backbone, FPN, head and the
        candidate selection (top-k per level, decoding, clipping, threshold as zero scores). With CUDA
        graphs that is one replay per forward. Pre-processing (resizing) and NMS stay eager
        (data-dependent shapes); so does training mode. The detections are the eager ones. If
        compiling fails, the model logs it and runs eagerly.

        compile_kwargs: torch.compile's (backend, mode, dynamic, ...).
        """
        self.uncompile_network()
        self._compiled_inference = torch.compile(self._inference_candidates, **compile_kwargs)
        self.network_compiled = True

    def uncompile_network(self) -> None:
        """Undo compile_network and compile_inference: the model runs eagerly again (nn.Module.compile
        keeps the compiled callable in _compiled_call_impl; without it, forward is the module's own)."""
        for module in (self.backbone, self.fpn, self.head):
            module._compiled_call_impl = None
        self._compiled_inference = None
        self.network_compiled = False

    def _compiled_detections(self, batch: Tensor, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Eval detections (in the resized images' pixels) through compile_inference's graph."""
        grid_sizes = feature_grid_sizes(batch.shape[-2], batch.shape[-1], self.anchor_generator.strides)
        anchors = self.anchor_generator(grid_sizes)  # cached per shape, outside the graph
        anchors_per_level = list(anchors.split(self.anchor_generator.num_anchors(grid_sizes)))
        sizes = torch.tensor(image_sizes, device=batch.device)
        boxes, scores, labels = self._with_eager_fallback(
            self._compiled_inference, self._inference_candidates, batch, anchors_per_level, sizes
        )
        return self.postprocessor.select(boxes, scores, labels)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("in training mode the model needs targets: model(images, targets)")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        batch, image_sizes, original_sizes, targets = self.preprocessor(images, targets)
        if self.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        if not self.training and self._compiled_inference is not None:
            detections = self._compiled_detections(batch, image_sizes)
            return self.preprocessor.restore(detections, image_sizes, original_sizes)
        cls_per_level, box_per_level, anchors_per_level = self.forward_batch(batch)
        if self.training:
            return self.criterion(
                torch.cat(cls_per_level, 1), torch.cat(box_per_level, 1), torch.cat(anchors_per_level, 0), targets
            )
        detections = self.postprocessor(cls_per_level, box_per_level, anchors_per_level, image_sizes)
        return self.preprocessor.restore(detections, image_sizes, original_sizes)


def build_model(cfg, class_names: list[str] | None = None) -> RetinaNet:
    """Build RetinaNet from a Config (see retinanet.config); loads backbone weights if configured."""
    m = cfg.model
    backbone = ResNetBackbone(m.backbone.depth, m.backbone.norm, m.backbone.freeze_at, m.backbone.fold_frozen_bn)
    if m.backbone.weights:
        backbone.load_weights(m.backbone.weights)
    fpn = FPN(backbone.out_channels, m.fpn.channels, m.fpn.p6_from)
    anchor_generator = AnchorGenerator(
        m.anchors.sizes, m.anchors.scales, m.anchors.aspect_ratios, STRIDES, m.anchors.torchvision_compat
    )
    head = RetinaNetHead(
        m.fpn.channels, anchor_generator.num_anchors_per_location, m.num_classes,
        m.head.num_convs, m.head.norm, m.head.prior_prob,
    )
    if m.head.channels != m.fpn.channels:
        raise ValueError(
            f"model.head.channels ({m.head.channels}) must equal model.fpn.channels ({m.fpn.channels}): "
            "the subnets run on the pyramid's features"
        )
    box_coder = BoxCoder(tuple(m.box_coder.weights), m.box_coder.scale_clamp)
    matcher = Matcher(
        m.matcher.fg_iou_thresh, m.matcher.bg_iou_thresh, m.matcher.allow_low_quality_matches, m.matcher.crowd_ioa_thresh
    )
    criterion = RetinaNetLoss(
        m.num_classes, matcher, box_coder,
        cls_loss=m.loss.cls, focal_alpha=m.loss.focal_alpha, focal_gamma=m.loss.focal_gamma,
        ohem_anchors_per_image=m.loss.ohem_anchors_per_image, ohem_fg_fraction=m.loss.ohem_fg_fraction,
        ohem_nms_thresh=m.loss.ohem_nms_thresh,
        box_loss=m.loss.box, smooth_l1_beta=m.loss.smooth_l1_beta, box_weight=m.loss.box_weight,
        normalizer_momentum=m.loss.normalizer_momentum,
    )
    postprocessor = PostProcessor(
        box_coder, m.inference.score_thresh, m.inference.topk_candidates, m.inference.nms_thresh,
        m.inference.detections_per_image,
    )
    i = m.input
    preprocessor = Preprocessor(
        i.min_size_train, i.max_size_train, i.min_size_test, i.max_size_test, i.pixel_mean, i.pixel_std,
        i.size_divisibility, m.num_classes,
    )
    if class_names is not None and len(class_names) != m.num_classes:
        raise ValueError(f"model.num_classes is {m.num_classes} but {len(class_names)} class names were given")
    return RetinaNet(preprocessor, backbone, fpn, head, anchor_generator, criterion, postprocessor, class_names)
