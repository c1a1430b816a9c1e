"""What a person sees: progress that reads well on a terminal and in a pipe, and a run log that keeps it.

- ``progress=auto`` (the default of every app) is a rich bar on a terminal and plain lines elsewhere
  (a pipe, a file, a cluster log); ``rich``, ``plain``, ``tqdm`` and ``none`` force one.
- :class:`PlainProgress` prints "done / total, elapsed, estimate" lines at a sensible rate, for the
  long steps outside Lightning (latency tables, device kits).
- :func:`run_log` copies everything printed during a run into the run folder's log file (without
  terminal control codes and without the live bars), so that the log holds what the user saw.
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Values of the ``progress`` option of every app.
PROGRESS_KINDS = ("auto", "rich", "plain", "tqdm", "none")

#: Seconds between two plain progress lines of one task (the first and the last always print).
PLAIN_EVERY = 15.0


def on_terminal(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default: the real standard output) is a terminal."""
    stream = stream if stream is not None else sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def resolve_progress(kind: str) -> str:
    """``auto`` -> ``rich`` on a terminal, ``plain`` otherwise; any other kind as it is."""
    if kind == "auto":
        return "rich" if on_terminal() else "plain"
    return kind


def fmt_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 07 min``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def eta(done: float, total: float, elapsed: float, budget: float | None = None) -> str:
    """``about 2 min 10 s left`` from the rate so far; with a time ``budget`` (a pass that repeats
    until its measurements are precise enough, or until the budget is spent) ``at most ... left``."""
    if budget is not None:
        if elapsed >= budget:  # a busy machine: every item still gets its minimum number of calls
            return f"past the time limit of {fmt_seconds(budget)}, finishing the minimum calls per item"
        return f"at most {fmt_seconds(budget - elapsed)} left (time limit {fmt_seconds(budget)})"
    if done <= 0 or total <= 0:
        return "estimating"
    return f"about {fmt_seconds(elapsed / done * max(0.0, total - done))} left"


class _Task:
    def __init__(self, description: str, total: float):
        self.description = description
        self.total = float(total)
        self.completed = 0.0
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.printed_done = False


class PlainProgress:
    """The part of ``rich.progress.Progress`` the measurements use (``add_task``, ``advance``,
    ``update``, ``tasks``), printed as plain lines: when a task starts, then at most every
    ``every`` seconds, and when it ends. ``budget`` (seconds) caps the estimate where a pass
    stops at a time limit."""

    def __init__(self, every: float = PLAIN_EVERY, stream: IO[str] | None = None, budget: float | None = None,
                 unit: str = "items"):
        self.every = float(every)
        self.stream = stream
        self.budget = budget
        self.unit = unit
        self.tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            for task in self.tasks:
                if not task.printed_done:
                    self._print(task, final=True)

    def add_task(self, description: str, total: float = 100.0, **_: Any) -> int:
        self.tasks.append(_Task(description, total))
        self._print(self.tasks[-1])
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1.0) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        self._maybe_print(task)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, **_: Any) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = float(total)
        if completed is not None:
            task.completed = float(completed)
        if advance is not None:
            task.completed += advance
        self._maybe_print(task)

    def _maybe_print(self, task: _Task) -> None:
        # the last line comes from __exit__: an adaptive pass may still raise its total
        if time.perf_counter() - task.last_print >= self.every:
            self._print(task)

    def _print(self, task: _Task, final: bool = False) -> None:
        if final and task.printed_done:
            return
        now = time.perf_counter()
        task.last_print = now
        elapsed = now - task.start
        done, total = int(task.completed), int(task.total)
        if final:
            task.printed_done = True
            if done < total and self.budget is not None:  # the pass stopped at its time limit
                line = (f"{task.description}: {done} {self.unit} in {fmt_seconds(elapsed)}, done "
                        f"(time limit {fmt_seconds(self.budget)})")
            else:
                line = f"{task.description}: {done}/{total} {self.unit}, done in {fmt_seconds(elapsed)}"
        elif done == 0:
            line = f"{task.description}: 0/{total} {self.unit}, started"
        else:
            line = (f"{task.description}: {done}/{total} {self.unit} ({100 * done / max(total, 1):.0f}%), "
                    f"{fmt_seconds(elapsed)}, {eta(done, total, elapsed, self.budget)}")
        print(line, file=self.stream if self.stream is not None else sys.stdout, flush=True)


def item_progress(budget: float | None = None, unit: str = "items"):
    """A progress display for a long loop over items: a transient rich bar (done / total, elapsed,
    estimate) on a terminal, :class:`PlainProgress` lines elsewhere."""
    if not on_terminal():
        return PlainProgress(budget=budget, unit=unit)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), transient=True)


# ------------------------------------------------------------------------------------------ run log
#: CSI sequences other than colours (cursor moves, erase, show/hide cursor): a live display's frame.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-HJKSTfhlsu]|\r(?!\n)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class _Tee:
    """A text stream that writes to ``stream`` and appends what a reader of the log wants to ``log``:
    colour codes stripped, live-display frames (cursor moves, carriage returns) left out."""

    def __init__(self, stream: IO[str], log: IO[str]):
        self._stream = stream
        self._log = log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        if text and not _CONTROL.search(text):
            self._log.write(_ANSI.sub("", text))
            self._log.flush()
        return n if n is not None else len(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


_ACTIVE_LOG: list[IO[str]] = []


def log_only(line: str) -> None:
    """Append ``line`` to the active run log without printing it (e.g. an epoch's metrics while a
    rich bar shows them on the terminal)."""
    if _ACTIVE_LOG:
        _ACTIVE_LOG[-1].write(line.rstrip("\n") + "\n")
        _ACTIVE_LOG[-1].flush()


@contextlib.contextmanager
def run_log(path: str | Path) -> Iterator[Path]:
    """Copy standard output and standard error into ``path`` (appended) while the block runs; both
    streams are line-buffered meanwhile, so that a pipe or a cluster log gets each line when printed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        out, err = sys.stdout, sys.stderr
        for stream in (out, err):  # a pipe is block-buffered: a line must show when it is printed
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True)
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        _ACTIVE_LOG.append(log)
        try:
            yield path
        finally:
            _ACTIVE_LOG.pop()
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = out, err
