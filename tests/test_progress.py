"""Progress lines with an ETA where click's bar would print only its title (a log file)."""

from __future__ import annotations

import io

from bot.progress import LineProgress


def test_a_log_file_gets_progress_lines_with_an_eta_and_the_item(monkeypatch):
    clock = iter([0.0, 12.0, 12.0, 30.0, 30.0, 31.0, 60.0, 60.0])
    monkeypatch.setattr("bot.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = LineProgress(100, "training psi", out, every=10, item_show_func=lambda m: m)
    with bar:
        bar.current_item = "loss 0.5"
        bar.update(25)  # 12 s in: shown, with an ETA of 36 s for the other 75
        bar.update(25)  # 30 s in: shown
        bar.update(1)  # 31 s: within 10 s of the last line, not shown
        bar.update(49)  # 60 s: done
    assert out.getvalue().splitlines() == [
        "training psi: 0/100",
        "training psi: 25/100 (25%), 0m12s elapsed, ETA 0m36s, loss 0.5",
        "training psi: 50/100 (50%), 0m30s elapsed, ETA 0m30s, loss 0.5",
        "training psi: 100/100 (100%), 1m00s elapsed, loss 0.5",
    ]
