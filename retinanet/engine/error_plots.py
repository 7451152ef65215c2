"""PNG pictures of the error analysis (needs matplotlib: `pip install 'retinanet[plots]'`): the TIDE
dAP bar chart and one precision-recall plot per class.

Drawn on matplotlib Figure objects directly, not through pyplot: no global figure state and no
interactive backend, so it works on a headless machine and inside a training process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .error_analysis import MAIN_ERRORS, SPECIAL_ERRORS, safe_file_name

DPI = 110
ERROR_COLORS = {  # one hue per cause; the two bounds in greys
    "Cls": "tab:red", "Loc": "tab:orange", "Both": "tab:olive", "Dupe": "tab:purple", "Bkg": "tab:blue",
    "Miss": "tab:green", "FP": "0.45", "FN": "0.7",
}
ERROR_LABELS = {
    "Cls": "Cls: wrong class", "Loc": "Loc: box off", "Both": "Both: class and box", "Dupe": "Dupe: duplicate",
    "Bkg": "Bkg: on background", "Miss": "Miss: object missed", "FP": "FP bound: perfect precision",
    "FN": "FN bound: perfect recall",
}
PR_CURVES = (  # (key in pr_curves.json, AP key, legend, style)
    ("precision50", "AP50", "IoU 0.50", {"color": "tab:blue"}),
    ("precision75", "AP75", "IoU 0.75", {"color": "tab:orange"}),
    ("precision", "AP", "mean IoU 0.50:0.95", {"color": "black", "linestyle": "--"}),
)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_tide(summary: dict[str, Any], path: Path) -> Path:
    """Horizontal bars on one scale: the dAP of each main error type with its number of errors, then,
    below a line, the FP and FN bounds; the title gives AP50. An undefined dAP reads n/a."""
    types = list(MAIN_ERRORS) + list(SPECIAL_ERRORS)
    # One row per type, a blank row between the causes and the bounds; top to bottom.
    rows = {error: len(types) - index for index, error in enumerate(MAIN_ERRORS)}
    rows.update({error: len(SPECIAL_ERRORS) - index - 1 for index, error in enumerate(SPECIAL_ERRORS)})
    values = {error: summary["dAP"][error] for error in types}
    top = max([value for value in values.values() if value is not None] + [0.01])
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax.barh([rows[e] for e in types], [values[e] or 0.0 for e in types], color=[ERROR_COLORS[e] for e in types])
    for error in types:
        text = "n/a" if values[error] is None else f"{values[error]:.3f}"
        if error in summary["counts"]:
            count = summary["counts"][error]
            text += f"   ({count} error{'' if count == 1 else 's'})"
        ax.text((values[error] or 0.0) + top * 0.02, rows[error], text, va="center", fontsize=8)
    ax.axhline(len(SPECIAL_ERRORS), color="0.6", linewidth=0.8)
    ax.set_yticks([rows[e] for e in types], [ERROR_LABELS[e] for e in types])
    ax.set_xlim(0, top * 1.5)
    ax.set_xlabel("dAP: AP50 gained by fixing every error of the type (0..1)")
    ap = summary["AP50"]
    ax.set_title(f"TIDE errors at IoU {summary['foreground_iou']:g} (background {summary['background_iou']:g}): "
                 f"AP50 {'n/a' if ap is None else f'{ap:.3f}'}, {summary['num_images']} images", fontsize=10)
    return _save(fig, path)


def plot_pr_curves(curves: dict[str, Any], folder: Path) -> list[Path]:
    """One PNG per class with objects, <position>_<name>.png in `folder`: precision against recall
    at IoU 0.50, at 0.75 and averaged over 0.50:0.95, as pycocotools interpolates them."""
    folder.mkdir(parents=True, exist_ok=True)
    recall = curves["recall"]
    paths = []
    for position, (name, entry) in enumerate(curves["classes"].items()):
        if entry is None:
            continue
        fig = Figure(figsize=(4.5, 4))
        ax = fig.subplots()
        for key, ap_key, legend, style in PR_CURVES:
            ax.plot(recall, entry[key], label=f"{legend}: AP {entry[ap_key]:.3f}", **style)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{name}: precision-recall")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        paths.append(_save(fig, folder / f"{position:02d}_{safe_file_name(name)}.png"))
    return paths
