"""`retinanet` command line: train, eval, infer, export, convert, make-synthetic."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, load_config


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine.trainer import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    metrics = train(cfg, resume=args.resume)
    if metrics:
        logging.getLogger("retinanet").info("final bbox AP %.4f AP50 %.4f", metrics.get("AP", 0), metrics.get("AP50", 0))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .engine.evaluator import eval_command

    eval_command(args.config, args.checkpoint, list(args.overrides), args.output_dir)
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from .inference import infer_command

    infer_command(
        args.checkpoint, args.inputs, args.output, config_path=args.config, score_thresh=args.score_thresh,
        batch_size=args.batch_size, device=args.device,
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_command

    export_command(args.checkpoint, args.format, args.out, image_size=args.image_size)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_torchvision_checkpoint

    cfg = convert_torchvision_checkpoint(args.input, args.output)
    logging.getLogger("retinanet").info(
        "wrote %s (ResNet-%d, %d classes)", args.output, cfg.model.backbone.depth, cfg.model.num_classes
    )
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .data import make_synthetic

    make_synthetic(args.root, args.num_train, args.num_val, args.image_size, args.seed)
    logging.getLogger("retinanet").info("wrote the synthetic dataset to %s", args.root)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retinanet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config (also under torchrun)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. solver.base_lr=0.02")
    p.add_argument("--output-dir", help="shorthand for train.output_dir=DIR")
    p.add_argument("--resume", action="store_true", help="continue from the last good checkpoint in the output dir")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint on the val set")
    p.add_argument("config", nargs="?", help="config file (default: the one saved in the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output-dir")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("infer", help="detect objects in images; writes drawn images and detections.json")
    p.add_argument("inputs", nargs="+", help="image files, folders or globs")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--score-thresh", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript")
    p.add_argument("out")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("convert", help="convert torchvision RetinaNet weights to a retinanet checkpoint")
    p.add_argument("--from", dest="source", choices=("torchvision",), required=True)
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("make-synthetic", help="write the built-in synthetic dataset in COCO format")
    p.add_argument("root")
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-val", type=int, default=128)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        logging.getLogger("retinanet").error("%s", err)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
