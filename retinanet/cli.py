"""`retinanet` command line: train, eval, infer, export, convert, convert-dataset, make-synthetic,
analyze-data, analyze-errors.

Every subcommand lives here and calls the library; nothing below imports this module.

KEY=VALUE config overrides (`solver.base_lr=0.02`) may stand anywhere on the line, before or after
the options, with or without a config file: a token is an override when its key starts with a
config section (model., data., solver., train.) and it is not the value of an option.

A user error (a missing or foreign file, a bad key or value, unusable data) prints one line that
names the file or key and exits with 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from .analysis import analyze_data
from .checkpoint import CheckpointError, load_model
from .config import ConfigError, load_config
from .convert import convert_torchvision_checkpoint
from .data import BadImageError, build_val_dataset, build_val_loader, make_synthetic, read_dataset
from .data.formats import read_yolo_names
from .engine import distributed as dist_utils
from .engine.error_analysis import ANALYSIS_DIR, analyze_errors, analyze_results_file
from .engine.evaluator import RESULTS_FILE, evaluate
from .engine.run_dir import check_writable
from .engine.trainer import NonFiniteLossError, TrainingStopped, train
from .export import export_command
from .data import IMAGE_SUFFIXES
from .inference import INFER_SCORE_THRESH, SCORE_THRESH_KEY, compile_for_inference, infer_command

logger = logging.getLogger("retinanet")

OVERRIDE_PATTERN = re.compile(r"^(?:model|data|solver|train)(?:\.\w+)+=")
# What a user can get wrong (files, keys, values, data); anything else is a bug and keeps its traceback.
# BadImageError: an image the data names that cannot be used (truncated, not of its json size).
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError, FileExistsError, ValueError, BadImageError)
# A DataLoader worker's exception comes back as "Caught NAME in DataLoader worker process N." and
# the worker's traceback (a BadImageError, which torch cannot rebuild, as a RuntimeError).
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.")
EXIT_USER_ERROR = 2
CHECK_IMAGES_HELP = "decode every image once before starting and report all bad files at once (data.check_images=true)"


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _format_metric(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------------------------
# The subcommands.


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if args.output_dir is not None:
        if not args.output_dir:
            raise ValueError("--output-dir is empty: give the folder of the run")
        # Set, not turned into an override: YAML would read `exp #2` as `exp`, `2024` as a number.
        cfg.train.output_dir = args.output_dir
    try:
        source = f"{args.config}" + (f" with {' '.join(overrides)}" if overrides else "")
        if args.output_dir is not None:
            source += f" --output-dir {args.output_dir}"
        metrics = train(cfg, resume=args.resume, overwrite=args.overwrite, config_source=source)
    except TrainingStopped as stopped:  # checkpoint saved and logged; `train && eval` must not go on
        return stopped.exit_code
    except dist_utils.MainProcessFailed as err:  # rank 0 refused to start and says why in its log
        logger.error("%s", err)
        return EXIT_USER_ERROR
    except OSError as err:
        if err.errno != errno.ENOSPC or args.debug:
            raise
        logger.error("%s (--debug shows the traceback)", err)
        return EXIT_USER_ERROR
    if metrics:
        logger.info("final bbox AP %s AP50 %s", _format_metric(metrics.get("AP")), _format_metric(metrics.get("AP50")))
    return 0


def eval_command(
    config_path: str | None, checkpoint: str, overrides: list[str] | tuple[str, ...] = (), output_dir: str | None = None,
    analyze: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint on the validation set of its config; works under torchrun.

    Args:
        config_path: a YAML config replacing the checkpoint's own; None uses the checkpoint's config.
        checkpoint: a checkpoint (retinanet.checkpoint), trained or converted.
        overrides: dotted KEY=VALUE strings applied on top of the config (e.g. data.val.ann_file=...).
        output_dir: where coco_results.json and metrics.json go; default: an "eval" folder next to
            the checkpoint.
        analyze: also write the error analysis of the results to OUTPUT_DIR/analysis (TIDE error
            types, per-class precision-recall curves; retinanet.engine.error_analysis).
    Returns:
        the metrics of `evaluate` (on every process).
    """
    model, cfg = load_model(checkpoint, config_path, overrides)
    was_distributed = dist_utils.is_distributed()
    device = dist_utils.init_distributed(cfg.train.device)  # joins torchrun's process group, if any
    try:
        rank, world_size = dist_utils.get_rank(), dist_utils.get_world_size()
        dataset = build_val_dataset(cfg)
        loader = build_val_loader(
            dataset, batch_size=max(1, cfg.solver.ims_per_batch // world_size),
            num_workers=cfg.data.num_workers, rank=rank, world_size=world_size, start_method=cfg.data.start_method,
        )
        out = Path(output_dir) if output_dir is not None else Path(checkpoint).resolve().parent / "eval"
        if cfg.model.inference.compile:
            compile_for_inference(model, device)
        if dist_utils.is_main_process():
            check_writable(out)  # before inference, not after it
            logger.info("results will be written to %s", out)
        metrics = evaluate(model.to(device), loader, dataset, device, output_dir=out)
        if analyze and dist_utils.is_main_process():
            results = json.loads((out / RESULTS_FILE).read_text())
            image_ids = [int(image_id) for image_id in dataset.image_ids]
            analyze_errors(dataset.coco, results, image_ids, list(dataset.class_names), out / ANALYSIS_DIR)
    finally:
        if not was_distributed:
            dist_utils.cleanup()
    return metrics


def _cmd_eval(args: argparse.Namespace) -> int:
    eval_command(args.config, args.checkpoint, list(args.overrides), args.output_dir, analyze=args.analyze)
    return 0


def _cmd_analyze_errors(args: argparse.Namespace) -> int:
    results = Path(args.results)
    out = Path(args.output_dir) if args.output_dir else (results if results.is_dir() else results.parent) / ANALYSIS_DIR
    check_writable(out)
    analyze_results_file(results, args.ann_file, out)
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    """0 if at least one image was processed, 1 if every image was skipped (each one logged)."""
    counts = infer_command(
        args.checkpoint, args.inputs, args.output, config_path=args.config, score_thresh=args.score_thresh,
        batch_size=args.batch_size, device=args.device, overrides=list(args.overrides), recursive=args.recursive,
        compile=args.compile,
    )
    return 1 if counts.processed == 0 else 0


def _cmd_export(args: argparse.Namespace) -> int:
    export_command(
        args.checkpoint, args.format, args.out, image_size=args.image_size, overrides=list(args.overrides),
        input_dtype=args.input_dtype,
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    cfg = convert_torchvision_checkpoint(args.input, args.output)
    logger.info("wrote %s (ResNet-%d, %d classes)", args.output, cfg.model.backbone.depth, cfg.model.num_classes)
    return 0


def _cmd_convert_dataset(args: argparse.Namespace) -> int:
    if args.source == "yolo":
        if args.split is not None:
            raise ValueError("--split is for VOC; a YOLO split is its images folder (SRC)")
        if args.names is None:
            raise ValueError("--from yolo needs --names: the data.yaml or names file of the class names")
        dataset, image_dir = read_dataset("yolo", args.names, args.src)
    else:
        class_names = None if args.names is None else read_yolo_names(args.names)
        dataset, image_dir = read_dataset("voc", args.split or "trainval", args.src, class_names)
    check_writable(Path(args.output).resolve().parent)
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(dataset, file)
    logger.info(
        "wrote %s (%d images, %d boxes, %d classes); train on it with data.<split>.ann_file=%s data.<split>.img_dir=%s",
        args.output, len(dataset["images"]), len(dataset["annotations"]), len(dataset["categories"]), args.output,
        image_dir,
    )
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    make_synthetic(args.root, args.num_train, args.num_val, args.image_size, args.seed)
    logger.info("wrote the synthetic dataset to %s", args.root)
    return 0


def _cmd_analyze_data(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides))
    analyze_data(cfg, args.output, max_images=args.max_images, fit=args.fit_anchors, generations=args.generations)
    return 0


# ----------------------------------------------------------------------------------------------
# Parsing.


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retinanet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides_help = "config overrides, anywhere on the line, e.g. solver.base_lr=0.02"

    p = sub.add_parser("train", help="train from a YAML config (also under torchrun)",
                       epilog=f"KEY=VALUE: {overrides_help}. Exit status: 0 trained to solver.max_iter; 1 NaN/Inf "
                              "loss (last good state saved); 2 user error; 128+N stopped by signal N after saving "
                              "a checkpoint (SIGHUP 129, SIGINT 130, SIGTERM 143)")
    p.add_argument("config", help="a YAML file, or a packaged config's name (e.g. configs/quickstart.yaml)")
    p.add_argument("--output-dir", help="the run's folder: sets train.output_dir to DIR as typed (never read as YAML)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in the output dir from its newest checkpoint (its config; new LR-schedule "
                            "and period values are applied, model/optimizer/batch/data changes refused; see README)")
    start.add_argument("--overwrite", action="store_true",
                       help="start from scratch in an output dir that holds a run, deleting its checkpoints and metrics")
    p.set_defaults(func=_cmd_train, takes_overrides=True)

    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint on the val set", epilog=f"KEY=VALUE: {overrides_help}")
    p.add_argument("config", nargs="?", help="config file (default: the one saved in the checkpoint)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output-dir", help="where metrics.json and coco_results.json go (default: CHECKPOINT_DIR/eval)")
    p.add_argument("--check-images", action="store_true", help=CHECK_IMAGES_HELP)
    p.add_argument("--analyze", action="store_true",
                   help=f"also say why the AP is what it is, in OUTPUT_DIR/{ANALYSIS_DIR}: TIDE error types and their "
                        "dAP (table in the log, tide.json, tide.png) and per-class precision-recall curves "
                        "(pr_curves.json, pr_curves/*.png); see docs/errors.md")
    p.set_defaults(func=_cmd_eval, takes_overrides=True)

    p = sub.add_parser("analyze-errors", help="TIDE error types and per-class PR curves of an evaluation's results",
                       epilog="What `eval --analyze` writes, from the files eval wrote; see docs/errors.md. The "
                              "pictures need matplotlib (pip install 'retinanet[plots]'); without it, the numbers only")
    p.add_argument("results", help=f"the folder `retinanet eval` wrote, or its {RESULTS_FILE}")
    p.add_argument("--ann-file", required=True,
                   help="the ground truth the results were computed on (COCO instances json); every image in it counts")
    p.add_argument("--output-dir", help=f"where the analysis goes (default: RESULTS_FOLDER/{ANALYSIS_DIR})")
    p.set_defaults(func=_cmd_analyze_errors, takes_overrides=False)

    p = sub.add_parser("infer", help="detect objects in images; writes drawn images and detections.json",
                       epilog=f"KEY=VALUE: {overrides_help}. Exit status: 0 at least one image processed; 1 every "
                              "image skipped (reasons in OUTPUT/skipped.json); 2 user error")
    p.add_argument("inputs", nargs="+",
                   help="image files, folders or globs ('photos/**/*.jpg'); a folder gives its "
                        f"{'/'.join(suffix.lstrip('.') for suffix in IMAGE_SUFFIXES)} files (hidden ones left out), its "
                        "subfolders' too with --recursive")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="search input folders' subfolders too (default: only the folder itself)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", help="a config replacing the checkpoint's own")
    p.add_argument("--output", required=True,
                   help="output folder; must not hold input images. Receives each image drawn at its path under the "
                        "folder or glob that found it (photos/a/x.jpg -> OUTPUT/a/x.jpg; JPEG and PNG keep their "
                        "format, others become PNG), detections.json (boxes in pixels of the image as viewers show "
                        "it, and the drawn file's path) and skipped.json")
    p.add_argument("--score-thresh", type=float, default=None,
                   help=f"draw and list detections scoring above this. Default: {INFER_SCORE_THRESH}, unless a "
                        f"KEY=VALUE override {SCORE_THRESH_KEY}=V or the --config file sets another value than "
                        "the evaluation default 0.05 (the checkpoint's saved value, an evaluation threshold, is "
                        "not used). Given, it replaces the --config file's value (logged) and must agree with "
                        "such an override. The threshold used and its origin are logged")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--compile", action="store_true",
                   help="low latency on a GPU: the network under torch.compile with CUDA graphs, compiled once per "
                        "input shape (eager on the CPU); also model.inference.compile=true")
    p.set_defaults(func=_cmd_infer, takes_overrides=True)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript", epilog=f"KEY=VALUE: {overrides_help}")
    p.add_argument("out")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    p.add_argument("--image-size", type=_positive_int, nargs=2, metavar=("H", "W"), default=None,
                   help="size of the example image traced (default 480 640); the file takes a (B, 3, H, W) "
                        "batch of any size")
    p.add_argument("--input-dtype", choices=("float32", "uint8"), default="float32",
                   help="what the file takes: float32 RGB in 0..1 (default) or uint8 RGB in 0..255")
    p.set_defaults(func=_cmd_export, takes_overrides=True)

    p = sub.add_parser("convert", help="convert torchvision RetinaNet weights to a retinanet checkpoint")
    p.add_argument("--from", dest="source", choices=("torchvision",), required=True)
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=_cmd_convert, takes_overrides=False)

    p = sub.add_parser("convert-dataset", help="write a Pascal VOC or YOLO dataset as a COCO instances json",
                       epilog="The json's file names are relative to the image folder the log line names (VOC: "
                              "SRC/JPEGImages; YOLO: SRC); training can also read these formats directly with "
                              "data.<split>.format=voc|yolo (see retinanet.data.formats)")
    p.add_argument("--from", dest="source", choices=("voc", "yolo"), required=True)
    p.add_argument("src", help="VOC: the VOC root (VOCdevkit/VOC2007); YOLO: the images folder (datasets/x/images/train)")
    p.add_argument("output", help="the COCO json to write")
    p.add_argument("--split", help="VOC: a split name under SRC/ImageSets/Main or a split file (default: trainval)")
    p.add_argument("--names", help="YOLO (required): the data.yaml or names file; VOC: a names file (one class per "
                                   "line) replacing the 20 VOC classes")
    p.set_defaults(func=_cmd_convert_dataset, takes_overrides=False)

    p = sub.add_parser("make-synthetic", help="write the built-in synthetic dataset in COCO format")
    p.add_argument("root")
    p.add_argument("--num-train", type=_positive_int, default=512)
    p.add_argument("--num-val", type=_positive_int, default=128)
    p.add_argument("--image-size", type=_positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_synthetic, takes_overrides=False)

    p = sub.add_parser("analyze-data", help="training boxes against the anchors: statistics, coverage, anchor fit",
                       epilog=f"KEY=VALUE: {overrides_help}. Sizes are measured in the resized frame the network "
                              "sees (model.input.min_size_train / max_size_train); see docs/anchors.md")
    p.add_argument("config", nargs="?", help="a YAML file, or a packaged config's name (default: the built-in "
                                             "defaults, with the KEY=VALUE overrides)")
    p.add_argument("--output", help="folder for summary.json, summary.txt and the plots "
                                    "(default: TRAIN.OUTPUT_DIR/analyze_data)")
    p.add_argument("--max-images", type=_positive_int, default=None,
                   help="analyse this many training images drawn at random (seeded by train.seed); default: all")
    p.add_argument("--fit-anchors", action="store_true",
                   help="search anchor sizes and aspect ratios that cover more boxes; prints the KEY=VALUE "
                        "overrides and the coverage before and after")
    p.add_argument("--generations", type=_positive_int, default=1000, help="mutations the anchor search tries")
    p.set_defaults(func=_cmd_analyze_data, takes_overrides=True)
    return parser


def split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Take the KEY=VALUE overrides out of a command line, wherever they stand.

    Returns:
        (the other tokens in their order, the overrides in theirs). A token that is the value of
        an option (`--output-dir x.y=1`) or follows `--` is never an override.
    """
    values_taken = {  # option string -> how many tokens follow it
        option: (action.nargs if isinstance(action.nargs, int) else 1)
        for subparser in _subparsers(parser) for action in subparser._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    }
    rest, overrides, pending_values, positional_only = [], [], 0, False
    for token in argv:
        if pending_values:
            rest.append(token)
            pending_values -= 1
        elif positional_only:
            rest.append(token)
        elif token == "--":
            positional_only = True
            rest.append(token)
        elif OVERRIDE_PATTERN.match(token):
            overrides.append(token)
        else:
            rest.append(token)
            if token.startswith("-") and "=" not in token:
                pending_values = values_taken.get(token, 0)
    return rest, overrides


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    commands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return [parser] + [sub for action in commands for sub in action.choices.values()]


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    tokens, overrides = split_overrides(parser, list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(tokens)
    if overrides and not args.takes_overrides:
        parser.error(f"{args.command} takes no KEY=VALUE overrides, got {' '.join(overrides)}")
    if getattr(args, "check_images", False):
        overrides.append("data.check_images=true")
    args.overrides = overrides
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except NonFiniteLossError as err:  # the trainer has saved the last good state
        if args.debug:
            raise
        logger.error("%s", err)
        return 1
    except Exception as err:
        message = user_error_message(err)
        if message is None or args.debug:
            raise
        logger.error("%s (--debug shows the traceback)", message)
        return EXIT_USER_ERROR


def user_error_message(err: BaseException) -> str | None:
    """What to print for a user error (USER_ERRORS, also when raised in a DataLoader worker: its
    own message, without the worker's traceback); None for anything else, a bug."""
    worker = _WORKER_ERROR.match(str(err))
    if worker is None:
        return str(err) if isinstance(err, USER_ERRORS) else None
    name = worker.group(1)
    if name not in {kind.__name__ for kind in USER_ERRORS}:
        return None
    # The traceback's last line of that exception (after any chained cause): "pkg.mod.NAME: message".
    found = re.findall(rf"^(?:[\w.]+\.)?{name}: (.*)$", str(err), flags=re.M)
    return found[-1] if found else None


if __name__ == "__main__":
    sys.exit(main())
