"""``rapport report eval``: the evaluation table as bar charts with intervals, and the
training curves of the run that produced each version, on one HTML page."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from learner.evaluation import COLUMNS  # noqa: E402

KEY_COLUMNS = (
    "combined",
    "bot_question",
    "distinct_2",
    "perplexity",
    "kl_to_prior",
    "embedding_similarity",
    "bot_repetition",
    "conversation_turns",
)


def plot_bars(results: dict, path: Path) -> None:
    names = [k for k in results if k != "samples"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, column in zip(axes.flat, KEY_COLUMNS, strict=True):
        values = [results[n][column]["value"] for n in names]
        errors = [
            [v - results[n][column]["low"] for n, v in zip(names, values, strict=True)],
            [results[n][column]["high"] - v for n, v in zip(names, values, strict=True)],
        ]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4, color="#4477aa")
        ax.set_xticks(range(len(names)), [_label(n) for n in names], fontsize=7)
        ax.set_title(column, fontsize=9)
    fig.suptitle("Self-play evaluation (95% bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")  # no label cut at the edge
    plt.close(fig)


def _label(name: str) -> str:
    """A model's whole name on lines of at most 18 characters (a folder path breaks at
    its slashes), so no label is cut and none overlaps its neighbour."""
    lines, line = [], ""
    for part in re.split(r"(?<=/)", name):  # each part keeps its trailing slash
        if line and len(line) + len(part) > 18:
            lines.append(line)
            line = ""
        line += part
        while len(line) > 18:
            lines.append(line[:18])
            line = line[18:]
    return "\n".join([*lines, line] if line else lines)


def plot_curves(runs: dict[str, Path], path: Path) -> bool:
    """Loss and KL-to-prior curves of each version's training run; False if none."""
    series = {}
    for name, metrics_file in runs.items():
        if metrics_file.exists():
            series[name] = [json.loads(x) for x in metrics_file.read_text().splitlines() if x]
    if not series:
        return False
    fig, (loss_ax, kl_ax) = plt.subplots(1, 2, figsize=(12, 4))
    for name, rows in series.items():
        loss_ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name[-24:])
        kl = [(r["step"], r["kl_to_prior"]) for r in rows if "kl_to_prior" in r]
        if kl:
            kl_ax.plot(*zip(*kl, strict=True), marker="o", label=name[-24:])
    loss_ax.set_title("training loss")
    kl_ax.set_title("KL(π‖prior) per bot token")
    for ax in (loss_ax, kl_ax):
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def write_eval_report(results: dict, runs: dict[str, Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    plot_bars(results, folder / "eval_bars.png")
    curves = plot_curves(runs, folder / "training_curves.png")
    names = [k for k in results if k != "samples"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>"
        + "".join(
            f"<td>{results[n][c]['value']:.3f}<br><small>[{results[n][c]['low']:.3f}, "
            f"{results[n][c]['high']:.3f}]</small></td>"
            for c in COLUMNS
        )
        + "</tr>"
        for n in names
    )
    samples = "".join(
        f"<h3>{html.escape(n)}</h3>"
        + "".join(
            "<p>"
            + "<br>".join(
                f"<b>{html.escape(t['role'])}</b>: {html.escape(t['text'])}" for t in conv
            )
            + "</p>"
            for conv in results["samples"].get(n, [])
        )
        for n in names
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>rapport: evaluation</title><style>body{{font-family:sans-serif;margin:2em}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:3px}}
img{{max-width:100%;height:auto}}.wide{{overflow-x:auto}}
</style></head><body><h1>Evaluation</h1>
<div class="wide"><table><tr><th>model</th>{head}</tr>{rows}</table></div>
<h2>Key metrics</h2><img src="eval_bars.png" alt="bar charts with intervals">
{
        '<h2>Training curves</h2><img src="training_curves.png" alt="training curves">'
        if curves
        else "<p>No training runs recorded for these versions.</p>"
    }
<h2>Sample conversations</h2>{samples}</body></html>"""
    index = folder / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
