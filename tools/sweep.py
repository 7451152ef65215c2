"""Train a list of configs one after another and tabulate their AP: the paper's ablations, or any grid.

    # A row family of the paper's Table 1, at the paper's setting (COCO, 8 GPUs):
    torchrun --nproc-per-node 8 tools/sweep.py configs/ablations/table1b_focal.sweep.yml
    # The same rows shrunk to a CPU on the synthetic dataset, two of them only:
    python tools/sweep.py configs/ablations/table1b_focal.sweep.yml \\
        --overlay configs/ablations/synthetic_cpu.yaml --rows gamma_0_alpha_0.75 gamma_2_alpha_0.25
    # A grid of KEY=VALUE lists over a config, 200 iterations each:
    python tools/sweep.py --config configs/quickstart.yaml --grid "model.loss.focal_gamma=[0, 1, 2]" --iters 200

A sweep file (configs/ablations/*.sweep.yml) is not a config: it names the config every row starts
from (`config`, relative to the sweep file) and lists the rows, each with a `name`, the KEY=VALUE
overrides that make it that row (`set`) and the paper's AP for it (`paper_ap`, optional).

The config of a row is, in this order: its config file, the overlay's keys (a partial config file,
e.g. the synthetic CPU setting), the --set overrides, the row's own `set`, then the budget (--iters)
and its output folder <out>/<row name>. Rows run one after another, each with
retinanet.engine.trainer.train. The sweep can be stopped at any time and run again with the same
command: a row whose folder holds sweep_result.json is done and skipped (its config must be the one
the row asks for now, else an error: results of another config are not reused); a row that was
interrupted continues from its last checkpoint (train's --resume). After every row, <out>/results.md
and <out>/results.json hold the table: AP, AP50, AP75 (COCO AP x 100, the paper's unit), the
training time of the run, and the paper's AP beside it.

Under torchrun every process runs the same rows in the same order; only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retinanet.config import Config, ConfigError, find_config_file, flatten, load_config, to_dict  # noqa: E402
from retinanet.engine import distributed as dist_utils  # noqa: E402
from retinanet.engine.run_dir import CHECKPOINT_GLOB, CHECKPOINTS_DIR  # noqa: E402
from retinanet.engine.trainer import TrainingStopped, find_last_checkpoint, train  # noqa: E402

logger = logging.getLogger("sweep")

RESULT_FILE = "sweep_result.json"  # in a row's folder: the row is done
TABLE_MD, TABLE_JSON = "results.md", "results.json"  # in the sweep's folder
SWEEP_KEYS = {"config", "rows"}
ROW_KEYS = {"name", "set", "paper_ap", "paper_ms"}
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")  # a folder name on any OS
TABLE_METRICS = ("AP", "AP50", "AP75")
# Config keys that do not change what a finished row measured: a result stays valid when they differ.
NOT_PART_OF_THE_RESULT = (
    "train.output_dir", "train.device", "train.log_period", "train.checkpoint_period", "train.eval_period",
    "train.keep_checkpoints", "data.num_workers", "data.check_images",
)


class SweepError(ValueError):
    """A sweep file, grid or output folder that cannot be used as asked."""


@dataclass
class Row:
    """One training run of a sweep."""

    name: str
    config: str  # the YAML file it starts from
    overrides: list[str] = field(default_factory=list)  # what makes it this row
    paper_ap: float | None = None  # COCO AP in percent, as the paper prints it
    paper_ms: float | None = None  # the paper's inference time (Table 1e)


# ----------------------------------------------------------------------------------------------
# Rows.


def read_sweep_file(path: str | Path) -> list[Row]:
    """The rows of a sweep definition file (see the module docstring)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"{path}: cannot read the sweep file: {err}") from None
    if not isinstance(data, dict) or not SWEEP_KEYS <= set(data) or set(data) - SWEEP_KEYS:
        raise SweepError(f"{path}: a sweep file is a mapping with exactly the keys {sorted(SWEEP_KEYS)}")
    config = path.parent / data["config"]
    if not config.is_file():
        raise SweepError(f"{path}: config: no file {config}")
    if not isinstance(data["rows"], list) or not data["rows"]:
        raise SweepError(f"{path}: rows: expected a non-empty list")
    rows = []
    for index, entry in enumerate(data["rows"]):
        if not isinstance(entry, dict) or "name" not in entry or set(entry) - ROW_KEYS:
            raise SweepError(f"{path}: rows[{index}]: expected a mapping with a name and only {sorted(ROW_KEYS)}")
        overrides = entry.get("set", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise SweepError(f"{path}: rows[{index}].set: expected a list of KEY=VALUE strings")
        rows.append(Row(str(entry["name"]), str(config), list(overrides), entry.get("paper_ap"), entry.get("paper_ms")))
    _check_names(rows, str(path))
    return rows


def grid_rows(configs: list[str], grid: list[str]) -> list[Row]:
    """One row per config and per combination of the grid's values.

    Args:
        configs: config files (or packaged config names).
        grid: "KEY=[V1, V2, ...]" strings, the values a YAML list ("KEY=V" alone is one value).
    """
    axes = []
    for item in grid:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--grid {item!r}: expected KEY=[V1, V2, ...]")
        try:
            values = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise SweepError(f"--grid {item!r}: the values are not valid YAML: {err}") from None
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SweepError(f"--grid {item!r}: no values")
        axes.append([(key.strip(), value) for value in values])
    rows = []
    for config in configs:
        stem = Path(config).name.split(".")[0]
        for combination in itertools.product(*axes):
            overrides = [f"{key}={json.dumps(value)}" for key, value in combination]
            label = "_".join(f"{key.rpartition('.')[2]}={_slug(value)}" for key, value in combination)
            rows.append(Row(f"{stem}_{label}" if label else stem, config, overrides))
    _check_names(rows, "--grid")
    return rows


def _slug(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "empty"


def _check_names(rows: list[Row], source: str) -> None:
    seen = set()
    for row in rows:
        if not ROW_NAME.match(row.name):
            raise SweepError(f"{source}: row name {row.name!r}: use letters, digits and . _ = + - (it names a folder)")
        if row.name in seen:
            raise SweepError(f"{source}: two rows are named {row.name!r}")
        seen.add(row.name)


def select_rows(rows: list[Row], names: list[str] | None) -> list[Row]:
    """The rows named (in the sweep's order), or all of them."""
    if not names:
        return rows
    unknown = sorted(set(names) - {row.name for row in rows})
    if unknown:
        raise SweepError(f"--rows: no row named {', '.join(unknown)}; the rows are {', '.join(r.name for r in rows)}")
    return [row for row in rows if row.name in names]


def overlay_overrides(path: str | Path) -> list[str]:
    """The keys of a partial config file as KEY=VALUE overrides (its own keys; no _base_ allowed)."""
    path = find_config_file(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "_base_" in data:
        raise SweepError(f"{path}: an overlay is a mapping of config keys without _base_")
    load_config(path)  # the keys must exist and hold valid values

    def flatten(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict):
                out += flatten(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}={json.dumps(value)}")  # JSON is YAML: the value reads back as is
        return out

    return flatten(data, "")


def budget_overrides(cfg: Config, iterations: int) -> list[str]:
    """solver.max_iter = iterations, the LR steps scaled with it, warm-up at most a quarter of it."""
    scale = iterations / cfg.solver.max_iter
    steps = sorted({min(iterations, max(1, round(step * scale))) for step in cfg.solver.steps})
    return [
        f"solver.max_iter={iterations}",
        f"solver.steps={json.dumps(steps)}",
        f"solver.warmup_iters={min(cfg.solver.warmup_iters, iterations // 4)}",
    ]


# ----------------------------------------------------------------------------------------------
# Runs.


def row_config(row: Row, common: list[str], iterations: int | None, run_dir: Path) -> tuple[Config, list[str]]:
    """The row's checked config and the overrides that make it (after its config file)."""
    overrides = common + row.overrides
    try:
        if iterations is not None:
            overrides = overrides + budget_overrides(load_config(row.config, overrides), iterations)
        overrides = overrides + [f"train.output_dir={json.dumps(str(run_dir))}"]
        return load_config(row.config, overrides), overrides
    except ConfigError as err:
        raise SweepError(f"row {row.name}: {err}") from None


def _comparable(cfg: Config | dict) -> dict:
    flat = flatten(to_dict(cfg) if isinstance(cfg, Config) else cfg)
    return {key: value for key, value in flat.items() if key not in NOT_PART_OF_THE_RESULT}


def finished_result(row: Row, cfg: Config, run_dir: Path) -> dict | None:
    """The row's saved result if it is done, None if not.

    Raises:
        SweepError: the result was measured with another config than the row's now.
    """
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    saved, wanted = _comparable(result["config"]), _comparable(cfg)
    # A key added to the schema after the run had, in effect, its default then; a key since removed
    # no longer exists to differ.
    defaults = _comparable(Config())
    differences = [f"{key}: {saved.get(key, defaults[key])!r} -> {value!r}"
                   for key, value in wanted.items() if saved.get(key, defaults[key]) != value]
    if differences:
        raise SweepError(
            f"row {row.name}: {path} holds the result of another config ({'; '.join(differences[:5])}"
            f"{' ...' if len(differences) > 5 else ''}); delete {run_dir} to rerun it, or sweep into another --out"
        )
    return result


def run_row(row: Row, cfg: Config, overrides: list[str], run_dir: Path) -> dict:
    """Train the row to the end (continuing an interrupted run) and return its result; rank 0 saves it."""
    checkpoint = None
    if any((run_dir / CHECKPOINTS_DIR).glob(CHECKPOINT_GLOB)):
        checkpoint = dist_utils.run_on_main(lambda: find_last_checkpoint(run_dir))
    resumed_from = dist_utils.broadcast_object(checkpoint.name if checkpoint is not None else None)
    interrupted = resumed_from is not None
    if interrupted:
        logger.info("row %s: continuing the interrupted run from %s", row.name, resumed_from)
    else:
        logger.info("row %s: training in %s", row.name, run_dir)
    start = time.perf_counter()
    metrics = train(cfg, resume=interrupted)
    seconds = time.perf_counter() - start
    result = {
        "name": row.name,
        "config_file": row.config,
        "overrides": overrides,
        "paper_ap": row.paper_ap,
        "paper_ms": row.paper_ms,
        "metrics": {key: value for key, value in (metrics or {}).items() if key != "per_class_AP"},
        "iterations": cfg.solver.max_iter,
        "train_seconds": round(seconds, 1),  # this invocation's, evaluation included
        "resumed_from": resumed_from,
        "config": to_dict(cfg),
    }
    if dist_utils.is_main_process():
        tmp = run_dir / f".{RESULT_FILE}.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(run_dir / RESULT_FILE)
    return result


def run_sweep(
    rows: list[Row], out: Path, common: list[str] = (), iterations: int | None = None, title: str = ""
) -> list[dict]:
    """Run every row not yet done, in order, writing the table after each. Returns one entry per row:
    its result, or {"name", "paper_ap", "status": "not run"} for rows left when a run stops."""
    common = list(common)
    planned = []
    for row in rows:
        run_dir = out / row.name
        cfg, overrides = row_config(row, common, iterations, run_dir)
        planned.append((row, cfg, overrides, run_dir))
    dist_utils.init_distributed(planned[0][1].train.device)
    entries: list[dict] = [{"name": row.name, "paper_ap": row.paper_ap, "paper_ms": row.paper_ms, "status": "not run"}
                           for row in rows]
    for index, (row, cfg, overrides, run_dir) in enumerate(planned):
        # Every process must take the same branch: they follow rank 0's reading of the folder.
        done = dist_utils.broadcast_object(dist_utils.run_on_main(lambda: finished_result(row, cfg, run_dir)))
        try:
            if done is not None:
                logger.info("row %s: done already (%s), skipped", row.name, run_dir / RESULT_FILE)
                entries[index] = {**done, "status": "done earlier"}
            else:
                entries[index] = {**run_row(row, cfg, overrides, run_dir), "status": "done"}
        finally:  # also when a run stops: the table shows what is done
            if dist_utils.is_main_process():
                write_table(out, entries, title, iterations)
    return entries


# ----------------------------------------------------------------------------------------------
# The table.


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(entries: list[dict], title: str = "", iterations: int | None = None) -> str:
    """The markdown table of a sweep: one line per row, rows not run marked so."""
    with_ms = any(entry.get("paper_ms") is not None for entry in entries)
    if iterations is None:  # each config's own budget: say it when the runs share it
        budgets = {entry["iterations"] for entry in entries if entry.get("iterations")}
        iterations = budgets.pop() if len(budgets) == 1 else None
    lines = [f"# {title}" if title else "# Sweep", ""]
    if iterations is not None:
        lines += [f"{iterations} iterations per run.", ""]
    lines += ["AP, AP50, AP75: COCO box AP x 100, as the paper prints it. train s: wall time of the run "
              "(training and final evaluation; of the last invocation if it was resumed).", ""]
    header = ["row", "AP", "AP50", "AP75", "train s", "paper AP"] + (["paper ms"] if with_ms else [])
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for entry in entries:
        metrics = entry.get("metrics", {})
        cells = [entry["name"]]
        if entry.get("status", "not run") == "not run":
            cells += ["not run"] + ["–"] * 3
        else:
            cells += [_percent(metrics.get(key)) for key in TABLE_METRICS] + [_number(entry.get("train_seconds"), 0)]
        cells.append(_number(entry.get("paper_ap")))
        if with_ms:
            cells.append(_number(entry.get("paper_ms"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, entries: list[dict], title: str = "", iterations: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = [{key: value for key, value in entry.items() if key != "config"} for entry in entries]
    for name, text in ((TABLE_MD, format_table(entries, title, iterations)),
                       (TABLE_JSON, json.dumps({"title": title, "iterations": iterations, "rows": summary}, indent=2))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


# ----------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", nargs="?", help="a sweep definition (configs/ablations/*.sweep.yml)")
    parser.add_argument("--config", action="append", default=[], help="a config to run (repeatable); with --grid, "
                        "each config is run at every combination")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                        help="values of a config key to sweep (repeatable: the product of all)")
    parser.add_argument("--rows", nargs="+", metavar="NAME", help="run only these rows of the sweep")
    parser.add_argument("--overlay", help="a partial config applied to every row before the row's own keys, "
                        "e.g. configs/ablations/synthetic_cpu.yaml")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="overrides for every row (before the row's own)")
    parser.add_argument("--iters", type=int, help="iterations per run (LR steps scaled to it); "
                        "default: each config's solver.max_iter")
    parser.add_argument("--out", help="folder of the runs and the table (default: output/sweeps/<sweep name>)")
    parser.add_argument("--dry-run", action="store_true", help="print each row's overrides and stop")
    args = parser.parse_args(argv)
    if bool(args.sweep_file) == bool(args.config):
        parser.error("give a sweep file or --config (not both)")
    if args.grid and not args.config:
        parser.error("--grid needs --config")
    if args.iters is not None and args.iters < 1:
        parser.error("--iters must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        rank = int(os.environ.get("RANK", 0))
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.sweep_file:
            rows, name = read_sweep_file(args.sweep_file), Path(args.sweep_file).name.split(".")[0]
        else:
            rows, name = grid_rows(args.config, args.grid), "grid"
        rows = select_rows(rows, args.rows)
        common = (overlay_overrides(args.overlay) if args.overlay else []) + list(args.overrides)
        out = Path(args.out or Path("output") / "sweeps" / name)
        title = " ".join([args.sweep_file or "grid", f"(overlay {args.overlay})" if args.overlay else ""]).strip()
        if args.dry_run:
            for row in rows:
                _, overrides = row_config(row, common, args.iters, out / row.name)
                print(f"{row.name}: {row.config} " + " ".join(overrides))
            return 0
        run_sweep(rows, out, common, args.iters, title)
    except (SweepError, ConfigError) as err:
        logger.error("%s", err)
        return 2
    except TrainingStopped as stopped:
        logger.warning("%s; run the same command again to continue the sweep", stopped)
        return stopped.exit_code
    logger.info("wrote %s and %s", out / TABLE_MD, out / TABLE_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
