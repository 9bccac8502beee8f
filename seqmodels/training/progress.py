"""Training progress where users look: a live bar on the terminal, lines in a log (the
Prefect task log when the train task passes its logger).

The bar (rich) shows, per model, step/total, loss, tokens/s, elapsed and remaining time, as
fairseq or a Lightning bar would. It draws only on an interactive terminal; logs, CI and
Prefect workers get the same figures as a line in the given log every `log_every_s` seconds
and at the last step, so a long training is never silent.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from seqmodels.training.trainer import Progress as TrainingStep

LOG_EVERY_S = 30.0


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: not known yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def progress_line(name: str, p: TrainingStep) -> str:
    """The figures of one step as a log line."""
    return (
        f"{name}: step {p.step}/{p.max_steps} ({100 * p.step / p.max_steps:.0f}%) "
        f"loss {p.loss:.4f}  {p.tokens_per_s:,.0f} tokens/s  "
        f"elapsed {_clock(p.elapsed_s)}  remaining {_clock(p.remaining_s)}"
    )


class TrainingProgress:
    """The trainer's `on_progress` callback for one model; use it as a context manager."""

    def __init__(
        self, name: str, logger: logging.Logger | logging.LoggerAdapter, log_every_s=LOG_EVERY_S
    ):
        self.name, self.logger, self.log_every_s = name, logger, log_every_s
        self.last_log = time.monotonic()
        self.last: TrainingStep | None = None  # not yet logged
        console = Console(file=sys.stderr)
        self.bar = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[tokens_per_s]:,.0f} tok/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.task = self.bar.add_task(name, total=None, loss=float("nan"), tokens_per_s=0.0)

    def __enter__(self) -> TrainingProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.last is not None:  # stopped early or by the time limit: say where
            self.logger.info(progress_line(self.name, self.last))

    def __call__(self, p: TrainingStep) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task,
                total=p.max_steps,
                completed=p.step,
                loss=p.loss,
                tokens_per_s=p.tokens_per_s,
            )
        now = time.monotonic()
        self.last = p
        if now - self.last_log >= self.log_every_s or p.step == p.max_steps:
            self.last_log, self.last = now, None
            self.logger.info(progress_line(self.name, p))
