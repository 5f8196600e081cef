"""The one progress bar off a terminal: plain lines with done/total, a rate and the time left."""

from __future__ import annotations

import time

from recpipe import progress


def test_plain_line_gives_the_mean_rate_when_updates_are_too_sparse_for_a_recent_one(monkeypatch, capsys):
    """A slow stage (an LLM describing on a busy CPU) advances rarely: rich has no recent speed then, and the
    line shows the mean rate since the start instead of 'rate pending'."""
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    bar = progress.progress_bar("describe", "prompts")
    task = bar.add_task("describe", total=10)
    bar.start()
    time.sleep(0.05)
    bar.advance(task, 1)  # one update: no speed estimate from rich yet
    bar.stop()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("describe: 1/10")]
    assert lines and "rate pending" not in lines[-1] and "/s" in lines[-1] and "left" in lines[-1]
