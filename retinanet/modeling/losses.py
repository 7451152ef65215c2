"""Focal loss (sigmoid and softmax) and the RetinaNet criterion, batched over the whole batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import anchor_blocks
from .box_coder import BoxCoder
from .matcher import FOREGROUND, IGNORE, Matcher
from .postprocess import class_aware_nms

# OHEM's NMS runs over the highest-loss anchors of each image only: at least this many, and this
# many per anchor kept (see RetinaNetLoss._ohem_nms_survivors for why that is exact).
OHEM_NMS_MIN_CANDIDATES = 2048
OHEM_NMS_CANDIDATES_PER_KEPT = 8


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) with p = sigmoid(logits), from logits.

    gamma = 0 is alpha-balanced cross entropy; alpha < 0 disables the alpha weighting (plain CE
    when gamma = 0 too). Computed in fp32 through BCE-with-logits, so it stays finite for any
    logit and under fp16/bf16 autocast.

    Args:
        logits: any shape, raw scores.
        targets: same shape, binary targets in {0, 1} (soft targets in [0, 1] also work).
    Returns:
        the loss per element (reduction "none"), or its mean / sum.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma != 0:
        prob = torch.sigmoid(logits)
        p_t = prob * targets + (1 - prob) * (1 - targets)
        ce = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        ce = (alpha * targets + (1 - alpha) * (1 - targets)) * ce
    return _reduce(ce, reduction)


def softmax_focal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float | Tensor | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Multi-class focal loss -alpha_c (1 - p_t)^gamma log(p_t), p_t the softmax probability of the true class.

    Args:
        logits: (N, C) or (N, C, d1, ...) raw scores.
        targets: (N,) or (N, d1, ...) int64 class indices; ignore_index entries contribute nothing.
        alpha: None, a float weight for every class, or a (C,) tensor of per-class weights.
        gamma: 0 gives (weighted) softmax cross entropy.
        reduction: "none", "sum", or "mean" (over non-ignored elements).
    """
    valid = targets != ignore_index
    # Ignored rows' logits become 0 before log_softmax: an inf / NaN there would otherwise give a
    # NaN loss (NaN * 0 is NaN) and a NaN gradient; torch.where passes them a gradient of exactly 0.
    logits = torch.where(valid.unsqueeze(1), logits.float(), 0.0)
    log_prob = F.log_softmax(logits, dim=1)
    safe_targets = targets.masked_fill(~valid, 0)
    log_p_t = log_prob.gather(1, safe_targets.unsqueeze(1)).squeeze(1)
    loss = -((1 - log_p_t.exp()) ** gamma) * log_p_t
    if alpha is not None:
        if isinstance(alpha, Tensor):
            loss = loss * alpha.to(loss)[safe_targets]
        else:
            loss = loss * alpha
    loss = torch.where(valid, loss, 0.0)
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    return _reduce(loss, reduction)


def giou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of paired (..., 4) xyxy boxes, elementwise.

    The formula of torchvision.ops.generalized_box_iou_loss, without its boolean indexing (a
    host-device sync on GPU).
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    inter_wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    intersection = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - intersection
    iou = intersection / (union + eps)
    hull_wh = torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return 1 - (iou - (hull - union) / (hull + eps))


def focal_loss_per_anchor(
    logits: Tensor, anchor_classes: Tensor, foreground: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """sigmoid_focal_loss(logits, one-hot targets).sum(dim=2), without building the targets.

    Every (anchor, class) pair has target 0 except the matched class of a foreground anchor, so the
    loss is the target-0 formula on the whole (B, A, K) tensor with those few entries replaced.
    With a hand-written backward, forward and backward each allocate two (B, A, K) buffers instead
    of the ~25 fresh (B, A, K) tensors of the element-wise formula and its autograd graph (at
    800x1333, K = 80 and B = 2 each is 130 MB, and on CPU allocating one costs more than the
    arithmetic done in it).

    Args:
        logits: (B, A, K) raw scores; computed in fp32.
        anchor_classes: (B, A) int64 class of each anchor's matched box; any value in 0..K-1 where
            the anchor is not foreground.
        foreground: (B, A) bool.
    Returns:
        (B, A) loss of each anchor, summed over classes.
    """
    return _FocalLossPerAnchor.apply(logits.float(), anchor_classes, foreground, alpha, gamma)


class _FocalLossPerAnchor(torch.autograd.Function):
    """Forward and backward walk the anchors in blocks (see blocks.py)."""

    @staticmethod
    def forward(ctx, logits: Tensor, anchor_classes: Tensor, foreground: Tensor, alpha: float, gamma: float) -> Tensor:
        ctx.save_for_backward(logits, anchor_classes, foreground)
        ctx.alpha, ctx.gamma = alpha, gamma
        blocks = anchor_blocks(logits.shape[1], 4 * logits.shape[0] * logits.shape[2], logits.device)
        per_block = [
            _focal_forward(logits[:, b], anchor_classes[:, b], foreground[:, b], alpha, gamma) for b in blocks
        ]
        return torch.cat(per_block, dim=1) if len(per_block) > 1 else per_block[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_per_anchor: Tensor):
        logits, anchor_classes, foreground = ctx.saved_tensors
        blocks = anchor_blocks(logits.shape[1], 4 * logits.shape[0] * logits.shape[2], logits.device)
        if len(blocks) == 1:
            grad = _focal_backward(logits, anchor_classes, foreground, grad_per_anchor, ctx.alpha, ctx.gamma)
        else:
            grad = torch.empty_like(logits)
            for b in blocks:
                grad[:, b] = _focal_backward(
                    logits[:, b], anchor_classes[:, b], foreground[:, b], grad_per_anchor[:, b], ctx.alpha, ctx.gamma
                )
        return grad, None, None, None, None


def _focal_forward(logits: Tensor, anchor_classes: Tensor, foreground: Tensor, alpha: float, gamma: float) -> Tensor:
    """(B, a, K) logits of a block of anchors -> (B, a) focal loss summed over classes."""
    # Target 0: FL = (1 - alpha) p^gamma softplus(x), since -log(1 - p) = softplus(x).
    loss, prob = _softplus_and_sigmoid(logits)
    if gamma != 0:
        loss.mul_(prob.pow_(gamma))
    target = anchor_classes[..., None]
    loss.scatter_(2, target, torch.where(foreground[..., None], 0.0, loss.gather(2, target)))
    foreground_loss = sigmoid_focal_loss(logits.gather(2, target).squeeze(2), foreground.float(), alpha, gamma)
    return loss.sum(dim=2) * (1 - alpha if alpha >= 0 else 1.0) + torch.where(foreground, foreground_loss, 0.0)


def _focal_backward(
    logits: Tensor, anchor_classes: Tensor, foreground: Tensor, grad_per_anchor: Tensor, alpha: float, gamma: float
) -> Tensor:
    """d loss / d logits of a block of anchors, (B, a, K), given d total / d per-anchor loss (B, a)."""
    # d/dx [p^gamma softplus(x)] = p^gamma (gamma (1 - p) softplus(x) + p), as softplus' = p.
    grad, prob = _softplus_and_sigmoid(logits)
    if gamma != 0:
        grad.mul_(gamma).addcmul_(grad, prob, value=-1).add_(prob).mul_(prob.pow_(gamma))
    else:
        grad.copy_(prob)
    grad.mul_((grad_per_anchor * (1 - alpha if alpha >= 0 else 1.0))[..., None])
    target = anchor_classes[..., None]
    with torch.enable_grad():  # the foreground entries: autograd on B * a values
        class_logits = logits.detach().gather(2, target).squeeze(2).requires_grad_()
        foreground_loss = sigmoid_focal_loss(class_logits, foreground.float(), alpha, gamma)
        (grad_class,) = torch.autograd.grad(foreground_loss, class_logits, grad_per_anchor)
    grad.scatter_(2, target, torch.where(foreground[..., None], grad_class[..., None], grad.gather(2, target)))
    return grad


def _softplus_and_sigmoid(logits: Tensor) -> tuple[Tensor, Tensor]:
    """softplus(x) and sigmoid(x) in two fresh buffers, with no other allocation.

    softplus(x) = max(x, 0) - log(sigmoid(|x|)): sigmoid(|x|) is in [0.5, 1], so log never sees 0.
    F.softplus and log1p are several times slower on CPU; for x < -10 this is no less accurate than
    the element-wise 1 - p_t of sigmoid_focal_loss (both lose all digits of p below ~6e-8).
    """
    softplus = torch.abs(logits).sigmoid_().log_().neg_()
    prob = torch.clamp(logits, min=0)
    softplus.add_(prob)
    return softplus, torch.sigmoid(logits, out=prob)


def pad_targets(targets: list[dict[str, Tensor]], key: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Stack variable-length (N_i, 4) boxes into (B, M, 4) with a (B, M) validity mask.

    Padded rows hold the box (0, 0, 1, 1) so that encoding them never produces inf/NaN.
    """
    boxes = [
        t[key].to(device=device, dtype=torch.float32).reshape(-1, 4) if key in t
        else torch.zeros(0, 4, device=device)
        for t in targets
    ]
    padded = torch.nn.utils.rnn.pad_sequence(boxes, batch_first=True)
    # Built on the device from host ints: a host-to-device copy of lengths would sync the stream.
    valid = torch.nn.utils.rnn.pad_sequence(
        [torch.ones(b.shape[0], dtype=torch.bool, device=device) for b in boxes], batch_first=True
    )
    dummy = (torch.arange(4, device=device) // 2).float()  # (0, 0, 1, 1)
    return torch.where(valid[..., None], padded, dummy), valid


class RetinaNetLoss(nn.Module):
    """Match anchors to ground truth and compute the classification and box losses of a batch.

    Args:
        num_classes: K.
        matcher: assigns anchors to boxes.
        box_coder: encodes box targets (and decodes predictions for GIoU).
        cls_loss: "focal" (paper), "ce" (alpha-balanced cross entropy, gamma = 0) or "ohem".
        focal_alpha, focal_gamma: 0.25, 2 in the paper.
        ohem_anchors_per_image: OHEM keeps this many highest-loss anchors per image.
        ohem_fg_fraction: OHEM keeps at most this fraction of foreground anchors (< 0: no limit).
        ohem_nms_thresh: OHEM first suppresses, per image, every anchor whose box overlaps a
            higher-loss anchor's box by IoU > this (paper: 0.7 or 0.5); <= 0 or >= 1: no NMS.
        box_loss: "smooth_l1", "l1" or "giou".
        smooth_l1_beta: 0.11 (Detectron).
        box_weight: multiplier of the box loss.
        normalizer_momentum: 0 divides by this batch's foreground count; > 0 by its running mean.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Matcher,
        box_coder: BoxCoder,
        cls_loss: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        ohem_anchors_per_image: int = 512,
        ohem_fg_fraction: float = -1.0,
        ohem_nms_thresh: float = 0.7,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 0.11,
        box_weight: float = 1.0,
        normalizer_momentum: float = 0.0,
    ):
        super().__init__()
        if cls_loss not in ("focal", "ce", "ohem"):
            raise ValueError(f"cls_loss must be focal, ce or ohem, got {cls_loss!r}")
        if box_loss not in ("smooth_l1", "l1", "giou"):
            raise ValueError(f"box_loss must be smooth_l1, l1 or giou, got {box_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.box_coder = box_coder
        self.cls_loss = cls_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = 0.0 if cls_loss in ("ce", "ohem") else focal_gamma
        self.ohem_anchors_per_image = ohem_anchors_per_image
        self.ohem_fg_fraction = ohem_fg_fraction
        self.ohem_nms_thresh = ohem_nms_thresh
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.box_weight = box_weight
        self.normalizer_momentum = normalizer_momentum
        # Training state, not a weight (detectron2 keeps it outside the state dict too): the trainer
        # saves it in its own checkpoint entry, so any checkpoint loads strictly into any model.
        self.register_buffer("running_num_foreground", torch.tensor(100.0), persistent=False)

    def forward(
        self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """
        Args:
            cls_logits: (B, A, K) raw class scores for all anchors of all levels.
            box_deltas: (B, A, 4) predicted (dx, dy, dw, dh).
            anchors: (A, 4) xyxy pixels of the padded batch.
            targets: per image {"boxes": (N, 4) xyxy pixels of the padded batch, "labels": (N,) int64
                in 0..K-1, optional "crowd_boxes": (C, 4)}.
        Returns:
            {"loss_cls": scalar, "loss_box": scalar}, both already divided by the foreground count.
        """
        device = cls_logits.device
        gt_boxes, gt_valid = pad_targets(targets, "boxes", device)
        gt_labels = torch.nn.utils.rnn.pad_sequence(
            [t["labels"].to(device=device, dtype=torch.int64).reshape(-1) for t in targets], batch_first=True
        )
        crowd_boxes, crowd_valid = (None, None)
        if any("crowd_boxes" in t for t in targets):
            crowd_boxes, crowd_valid = pad_targets(targets, "crowd_boxes", device)
        matched_idx, labels = self.matcher(anchors, gt_boxes, gt_valid, crowd_boxes, crowd_valid)
        foreground = labels == FOREGROUND  # (B, A)
        valid = labels != IGNORE

        num_foreground = foreground.sum().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP averages gradients over processes, so dividing each by the mean count gives
            # exactly the single-process loss on the whole batch.
            torch.distributed.all_reduce(num_foreground)
            num_foreground = num_foreground / torch.distributed.get_world_size()
        normalizer = self._normalizer(num_foreground)

        if gt_labels.shape[1] > 0:
            anchor_classes = gt_labels.gather(1, matched_idx)
        else:
            anchor_classes = torch.zeros_like(matched_idx)
        loss_cls = self._classification_loss(cls_logits, anchor_classes, foreground, valid, anchors) / normalizer

        matched_boxes = gt_boxes.gather(1, matched_idx[..., None].expand(-1, -1, 4)) if gt_boxes.shape[1] else None
        loss_box = self._box_loss(box_deltas, anchors, matched_boxes, foreground) / normalizer
        return {"loss_cls": loss_cls, "loss_box": self.box_weight * loss_box}

    def _normalizer(self, num_foreground: Tensor) -> Tensor:
        if self.normalizer_momentum > 0 and self.training:
            m = self.normalizer_momentum
            self.running_num_foreground.mul_(m).add_((1 - m) * num_foreground.detach())
            return self.running_num_foreground.clamp(min=1.0)
        return num_foreground.clamp(min=1.0)

    def _classification_loss(
        self, logits: Tensor, anchor_classes: Tensor, foreground: Tensor, valid: Tensor, anchors: Tensor
    ) -> Tensor:
        per_anchor = focal_loss_per_anchor(logits, anchor_classes, foreground, self.focal_alpha, self.focal_gamma)
        if self.cls_loss != "ohem":
            return torch.where(valid, per_anchor, 0.0).sum()
        per_anchor = torch.where(valid, per_anchor, float("-inf"))  # (B, A)
        candidates = per_anchor.detach()
        if 0 < self.ohem_nms_thresh < 1:
            survivors = self._ohem_nms_survivors(candidates, foreground, anchors)
            candidates = candidates.masked_fill(~survivors, float("-inf"))
        return per_anchor.masked_fill(~self._ohem_selection(candidates, foreground), 0.0).sum()

    def _ohem_nms_survivors(self, per_anchor_loss: Tensor, foreground: Tensor, anchors: Tensor) -> Tensor:
        """OHEM's deduplication (Shrivastava et al. 2016, as in the paper's Table 1d): NMS over each
        image's anchors, scored by their loss, at IoU ohem_nms_thresh.

        The boxes are the anchors themselves, the single-stage counterpart of OHEM's RoIs: the loss
        being deduplicated is that of the anchor's box (the matcher labels the anchor by it), and
        the anchors do not depend on the regression, which early in training is noise.

        NMS runs over the N highest-loss anchors of each image, not all ~100k: greedy NMS decides
        each box from the higher-scored boxes alone, so the survivors among the top N are exactly
        the survivors of a full NMS that score among the top N. When the top N hold enough of them
        for _ohem_selection (ohem_anchors_per_image survivors; with the foreground cap, enough
        foreground survivors (or every foreground anchor) and enough background survivors to fill
        the rest), the selection equals that of a full NMS (up to ties in loss); otherwise N grows
        4x and NMS runs again (one host sync per try). All images go through one NMS call.

        Args:
            per_anchor_loss: (B, A) detached loss of each anchor, -inf where ignored.
            foreground: (B, A) bool.
            anchors: (A, 4) xyxy pixels of the padded batch, shared by the images.
        Returns:
            (B, A) bool: the anchor survives the NMS. Survivors ranked below the top N are False,
            which cannot change the selection (see above).
        """
        batch_size, num_anchors = per_anchor_loss.shape
        num_keep = min(self.ohem_anchors_per_image, num_anchors)
        max_fg = int(num_keep * self.ohem_fg_fraction)
        # Anchors reach past the image: shifted to non-negative coordinates (IoU does not change) so
        # that class_aware_nms's per-image offsets cannot make boxes of two images overlap.
        boxes = anchors.float() - anchors.float().min()
        image_index = torch.arange(batch_size, device=per_anchor_loss.device)[:, None]
        num_candidates = min(num_anchors, max(OHEM_NMS_MIN_CANDIDATES, OHEM_NMS_CANDIDATES_PER_KEPT * num_keep))
        while True:
            loss, index = per_anchor_loss.topk(num_candidates, dim=1)  # (B, N), by decreasing loss
            kept = class_aware_nms(
                boxes[index].reshape(-1, 4), loss.reshape(-1), image_index.expand_as(index).reshape(-1),
                self.ohem_nms_thresh,
            )
            survives = torch.zeros(batch_size * num_candidates, dtype=torch.bool, device=loss.device)
            survives = survives.index_fill_(0, kept, True).view(batch_size, num_candidates) & torch.isfinite(loss)
            if num_candidates == num_anchors:
                break
            if self.ohem_fg_fraction < 0:
                enough = survives.sum(dim=1) >= num_keep
            else:
                candidate_fg = foreground.gather(1, index)
                fg_survivors = (survives & candidate_fg).sum(dim=1)
                bg_survivors = (survives & ~candidate_fg).sum(dim=1)
                every_fg_in = (candidate_fg & torch.isfinite(loss)).sum(dim=1) == foreground.sum(dim=1)
                enough = ((fg_survivors >= max_fg) | every_fg_in) & (
                    bg_survivors >= num_keep - torch.clamp(fg_survivors, max=max_fg)
                )
            every_valid_in = ~torch.isfinite(loss[:, -1])
            if bool((enough | every_valid_in).all()):
                break
            num_candidates = min(num_anchors, 4 * num_candidates)
        return torch.zeros_like(foreground).scatter_(1, index, survives)

    def _ohem_selection(self, per_anchor_loss: Tensor, foreground: Tensor) -> Tensor:
        """(B, A) mask of the hardest anchors of each image (OHEM), with an optional fg cap."""
        num_keep = min(self.ohem_anchors_per_image, per_anchor_loss.shape[1])
        if self.ohem_fg_fraction < 0:
            return self._top_mask(per_anchor_loss, num_keep)
        max_fg = int(num_keep * self.ohem_fg_fraction)
        fg_loss = per_anchor_loss.masked_fill(~foreground, float("-inf"))
        fg_keep = self._top_mask(fg_loss, max_fg)
        bg_loss = per_anchor_loss.masked_fill(foreground, float("-inf"))
        # Fill the rest of each image's quota with the hardest background anchors.
        bg_quota = num_keep - fg_keep.sum(dim=1, keepdim=True)  # (B, 1)
        order = bg_loss.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        bg_keep = (rank < bg_quota) & torch.isfinite(bg_loss)
        return fg_keep | bg_keep

    @staticmethod
    def _top_mask(values: Tensor, k: int) -> Tensor:
        mask = torch.zeros_like(values, dtype=torch.bool)
        if k <= 0:
            return mask
        top_values, top_idx = values.topk(k, dim=1)
        return mask.scatter_(1, top_idx, torch.isfinite(top_values))

    def _box_loss(self, deltas: Tensor, anchors: Tensor, matched_boxes: Tensor | None, foreground: Tensor) -> Tensor:
        if matched_boxes is None:  # no box in the whole batch
            return deltas.sum() * 0.0
        deltas = deltas.float()
        # Non-foreground anchors get themselves as target (zero deltas): finite everywhere, so
        # the masked-out entries cannot leak NaN into the gradient.
        anchors = anchors[None].expand_as(matched_boxes)
        matched_boxes = torch.where(foreground[..., None], matched_boxes, anchors)
        if self.box_loss == "giou":
            pred_boxes = self.box_coder.decode(deltas, anchors)
            loss = giou_loss(pred_boxes, matched_boxes)
        else:
            target = self.box_coder.encode(matched_boxes, anchors)
            if self.box_loss == "l1":
                loss = F.l1_loss(deltas, target, reduction="none").sum(dim=2)
            else:
                loss = F.smooth_l1_loss(deltas, target, reduction="none", beta=self.smooth_l1_beta).sum(dim=2)
        return torch.where(foreground, loss, 0.0).sum()
