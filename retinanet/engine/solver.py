"""Optimizer (SGD / AdamW with per-parameter-kind weight decay) and the LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def scaled_lr(solver_cfg) -> float:
    """Linear scaling rule: base_lr is for reference_batch_size images per iteration."""
    return solver_cfg.base_lr * solver_cfg.ims_per_batch / solver_cfg.reference_batch_size


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float, weight_decay_bias: float) -> list[dict]:
    """Trainable parameters split by the weight decay each kind gets (norm affine, bias, weights)."""
    groups: dict[float, list] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            elif name == "bias":
                decay = weight_decay_bias
            else:
                decay = weight_decay
            groups.setdefault(decay, []).append(param)
    return [{"params": params, "weight_decay": decay} for decay, params in groups.items()]


def build_optimizer(solver_cfg, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, solver_cfg.weight_decay, solver_cfg.weight_decay_norm, solver_cfg.weight_decay_bias)
    lr = scaled_lr(solver_cfg)
    if solver_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=solver_cfg.momentum, foreach=True)
    if solver_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(solver_cfg.betas), foreach=True)
    raise ValueError(f"solver.optimizer must be sgd or adamw, got {solver_cfg.optimizer!r}")


def lr_factor(iteration: int, solver_cfg) -> float:
    """Multiplier of the scaled LR at `iteration`: linear warm-up, then multi-step or cosine."""
    if solver_cfg.scheduler == "multistep":
        factor = solver_cfg.gamma ** sum(iteration >= step for step in solver_cfg.steps)
    else:
        progress = min(iteration / solver_cfg.max_iter, 1.0)
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    if iteration < solver_cfg.warmup_iters:
        alpha = iteration / solver_cfg.warmup_iters
        factor *= solver_cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(solver_cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration; its state (last_epoch = iteration) goes in the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, solver_cfg))
