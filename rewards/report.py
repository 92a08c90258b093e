"""``rapport report rewards``: how each implicit signal behaves, and whether it agrees
with what people say they like (the explicit votes): the question Jaques et al. 2019
ask of their implicit rewards.

Writes into one folder: ``distributions.png`` (a histogram per signal),
``correlations.png`` (the correlation matrix of all signals and the combined reward),
``vote_agreement.png`` (each signal's correlation with the votes, on voted turns only;
the table beside it has the correlation with the end-of-chat ratings too) and
``index.html`` that shows them with the ratings (count and mean answer per question),
the reply safety filter's rate (replies withdrawn / replies written, on self-play and on
live chats) and the top and bottom scored examples per signal.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bot.errors import RapportError  # noqa: E402
from bot.store import Store  # noqa: E402
from rewards.suite import COMBINED, SIGNAL_NAMES  # noqa: E402

EXAMPLES = 3


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or there are < 3 points."""
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def signal_matrix(store: Store) -> tuple[list[int], dict[str, np.ndarray]]:
    names = (*SIGNAL_NAMES, COMBINED)
    table = store.reward_table(names)
    ids = sorted(m for m, row in table.items() if all(n in row for n in names))
    return ids, {n: np.array([table[m][n] for m in ids]) for n in names}


def plot_distributions(columns: dict[str, np.ndarray], path: Path) -> None:
    cols = 4
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows))
    for ax, (name, values) in zip(axes.flat, columns.items(), strict=False):
        ax.hist(values, bins=30, color="#4477aa")
        ax.set_title(f"{name}\nmean {values.mean():.3f}, sd {values.std():.3f}", fontsize=9)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def plot_correlations(columns: dict[str, np.ndarray], path: Path) -> np.ndarray:
    names = list(columns)
    matrix = np.array([[correlation(columns[a], columns[b]) for b in names] for a in names])
    fig, ax = plt.subplots(figsize=(9, 8))
    image = ax.imshow(np.nan_to_num(matrix), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            label = "–" if math.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}"
            ax.text(j, i, label, ha="center", va="center", fontsize=6)
    fig.colorbar(image)
    ax.set_title("Correlation between reward signals (Pearson)")
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return matrix


def plot_vote_agreement(columns: dict[str, np.ndarray], path: Path) -> dict[str, float]:
    voted = columns["manual_vote"] != 0
    names = [n for n in columns if n != "manual_vote"]
    agreement = {n: correlation(columns[n][voted], columns["manual_vote"][voted]) for n in names}
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(names)), [np.nan_to_num(agreement[n]) for n in names], color="#228833")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylim(-1, 1)
    ax.set_title(f"Correlation with explicit votes, on the {int(voted.sum())} voted bot turns")
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return agreement


def rating_agreement(store: Store, ids: list[int], columns: dict[str, np.ndarray]) -> dict:
    """Each signal's correlation with its conversation's mean rating answer, over the
    bot turns of rated conversations (NaN when fewer than 3 or constant)."""
    rated = store.rated_turns()
    rating = np.array([rated.get(m, np.nan) for m in ids])
    keep = ~np.isnan(rating)
    return {n: correlation(v[keep], rating[keep]) for n, v in columns.items()}


def _r(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def examples_html(store: Store, name: str) -> str:
    rows = store.scored_examples(name, EXAMPLES)
    if not rows:
        return ""
    bottom, top = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    picked = [("top", r) for r in top] + [("bottom", r) for r in bottom]
    cells = "".join(
        "<tr><td>{}</td><td>{:.3f}</td><td>{}</td><td><b>{}</b></td><td>{}</td></tr>".format(
            which,
            r["value"],
            html.escape(_short(r["prev_user"])),
            html.escape(_short(r["bot"])),
            html.escape(_short(r["next_user"])),
        )
        for which, r in picked
    )
    return (
        f"<h3>{html.escape(name)}</h3><table><tr><th></th><th>value</th><th>user said</th>"
        f"<th>bot replied</th><th>user replied</th></tr>{cells}</table>"
    )


def _short(text: str | None, limit: int = 300) -> str:
    if text is None:
        return "—"
    return text if len(text) <= limit else text[:limit] + "…"


def ratings_summary(store: Store) -> str:
    """One line: how many conversations are rated, and the mean answer per question."""
    count, means = store.rating_summary()
    if not count:
        return "no rated conversations yet (/rate in the terminal or on Discord)"
    answers = ", ".join(f"{q} {m:.2f}" for q, m in means.items())
    return f"{count:,} rated conversation{'s' if count != 1 else ''}; mean answers: {answers}"


def safety_summary(store: Store) -> str:
    """One line: the share of the model's replies the safety filter withdrew, on
    self-play (``rapport simulate``) and on live platforms (terminal, Discord).

    Withdrawn replies over every reply the model wrote there (withdrawn ones included).
    """
    rates = store.safety_rates()
    groups = {
        "self-play": [rates.get("simulated", (0, 0))],
        "live": [v for platform, v in rates.items() if platform != "simulated"],
    }
    parts = []
    for name, values in groups.items():
        flagged, replies = sum(f for f, _ in values), sum(n for _, n in values)
        share = f" ({flagged / replies:.2%})" if replies else ""
        parts.append(f"{name} {flagged:,} of {replies:,} replies{share}")
    return "safety filter withdrew: " + "; ".join(parts)


def ratings_html(store: Store) -> str:
    count, means = store.rating_summary()
    if not count:
        return f"<p>{html.escape(ratings_summary(store))}</p>"
    cells = "".join(f"<tr><td>{q}</td><td>{m:.2f}</td></tr>" for q, m in means.items())
    return (
        f"<p>{count:,} rated conversations (1 = poor, 5 = great).</p>"
        f"<table><tr><th>question</th><th>mean</th></tr>{cells}</table>"
    )


def write_report(store: Store, folder: Path) -> Path:
    """Write the figures and ``index.html`` into ``folder``; return the HTML path."""
    folder.mkdir(parents=True, exist_ok=True)
    ids, columns = signal_matrix(store)
    if not ids:
        raise RapportError("no scored bot turns yet: run `rapport score` first")
    plot_distributions(columns, folder / "distributions.png")
    plot_correlations(columns, folder / "correlations.png")
    agreement = plot_vote_agreement(columns, folder / "vote_agreement.png")
    with_ratings = rating_agreement(store, ids, columns)
    agreement_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_r(v)}</td><td>{_r(with_ratings[n])}</td></tr>"
        for n, v in sorted(agreement.items(), key=lambda kv: -np.nan_to_num(kv[1], nan=-2))
    )
    examples = "".join(examples_html(store, n) for n in (*SIGNAL_NAMES, COMBINED))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rapport: reward report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}
table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;
padding:4px;vertical-align:top;font-size:13px}}img{{max-width:100%;height:auto}}</style></head><body>
<h1>Reward signals</h1>
<p>{len(ids):,} scored bot turns, {int((columns["manual_vote"] != 0).sum()):,} with votes.</p>
<h2>Distributions</h2><img src="distributions.png" alt="distributions of each signal">
<h2>Correlations</h2><img src="correlations.png" alt="correlation matrix">
<h2>Agreement with explicit votes</h2>
<p>Do implicit signals agree with what people say they like? Pearson correlation of
each signal with the mean vote, over the voted bot turns only, and with the end-of-chat
rating (the mean answer) over the bot turns of rated conversations (– when
undefined).</p>
<img src="vote_agreement.png" alt="correlation with votes">
<table><tr><th>signal</th><th>r with votes</th><th>r with ratings</th></tr>{agreement_rows}
</table>
<h2>End-of-chat ratings</h2>{ratings_html(store)}
<h2>Reply safety filter</h2><p>{html.escape(safety_summary(store))}</p>
<h2>Top and bottom examples</h2>{examples}
</body></html>
"""
    index = folder / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
