"""The one progress-bar layout recpipe shows (training steps, users scored, items described, ...).

`progress_bar` is a rich Progress: title, bar, done/total, an info column, elapsed, remaining. Off a terminal
(a log file, nohup, a batch job) rich draws nothing until the bar stops, so there it prints a plain line
every PLAIN_EVERY_S seconds instead. `counter` is a started bar with one task, for a loop that counts.
"""

from __future__ import annotations

import time

PLAIN_EVERY_S = 30.0  # off a terminal (a log file, nohup, a batch job) a progress line this often


def progress_bar(title: str, info: str, disable: bool = False, transient: bool = False):
    """The one progress bar layout: title, bar, done/total, info, elapsed, remaining (rich markup allowed).
    Off a terminal rich draws nothing until the bar stops, so there it prints a plain line instead every
    PLAIN_EVERY_S seconds: done/total, the info text, rate and time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Progress(Progress):
        def __init__(self, *columns, **kwargs):
            super().__init__(*columns, **kwargs)
            self._plain = not self.disable and not self.console.is_terminal
            self._last = time.monotonic()

        def update(self, task_id, **kwargs) -> None:
            super().update(task_id, **kwargs)
            if self._plain and time.monotonic() - self._last >= PLAIN_EVERY_S:
                self._last = time.monotonic()
                self._line(self._tasks[task_id])

        def advance(self, task_id, advance: float = 1) -> None:
            self.update(task_id, advance=advance)

        def _line(self, task) -> None:
            head = Text.from_markup(title.format(task=task)).plain
            tail = Text.from_markup(info.format(task=task)).plain
            done = f"{task.completed:,.0f}/{task.total:,.0f}" if task.total else f"{task.completed:,.0f}"
            rate, left = task.speed, task.time_remaining
            if rate is None and task.elapsed and task.completed:  # too few recent updates: the mean rate
                rate = task.completed / task.elapsed
                left = (task.total - task.completed) / rate if task.total else None
            rest = f"{rate:,.1f}/s" if rate else "rate pending"
            if left is not None:
                rest += f", {hms(left)} left"
            self.console.print(f"{head}: {done} {tail} ({rest})", markup=False, highlight=False, soft_wrap=True)

    return _Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TextColumn(info), TimeElapsedColumn(),
                     TimeRemainingColumn(), disable=disable, transient=transient)


def hms(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def counter(title: str, name: str, total: int, unit: str, transient: bool = True):
    """A started progress bar with one task `name` counting `total` `unit`s; advance it with
    `bar.advance(bar.task_ids[0], n)` and end it with `bar.stop()`."""
    bar = progress_bar(title, unit, transient=transient)
    bar.add_task(name, total=total)
    bar.start()
    return bar


__all__ = ["progress_bar", "counter", "hms", "PLAIN_EVERY_S"]
