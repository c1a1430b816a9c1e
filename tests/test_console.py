"""nas.console: plain progress lines (done / total, estimate) and the run log."""
from __future__ import annotations

import io
import re
import sys

import torch

from nas.console import PlainProgress, fmt_seconds, run_log
from nas.latency.devices import CpuDevice


def test_table_measurement_shows_items_done_and_an_estimate_in_a_pipe(capsys):
    device = CpuDevice(threads=1, warmup=1, repeats=3)
    items = {f"conv{i}": (torch.nn.Conv2d(4, 4, 3, padding=1), (4, 8, 8)) for i in range(4)}
    res = device.measure(items, progress=True, desc="latency table test")
    assert set(items) <= set(res)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "latency table test: 0/12 timed calls, started"
    assert re.fullmatch(r"latency table test: 12/12 timed calls, done in \d+ s", lines[-1]), lines
    assert len(lines) == 2, lines  # a pass of a second: no line per call



def test_plain_progress_rate_and_estimate():
    out = io.StringIO()
    with PlainProgress(every=3600, stream=out) as bar:
        task = bar.add_task("build", total=100)
        for _ in range(99):
            bar.advance(task)
        bar.update(task, total=150)  # an adaptive pass adds rounds
        for _ in range(51):
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0] == "build: 0/100 items, started"  # no line per item
    assert re.fullmatch(r"build: 150/150 items, done in \d+ s", lines[1])
    out = io.StringIO()
    with PlainProgress(every=0, stream=out) as bar:
        task = bar.add_task("b", total=4)
        bar.advance(task)
    assert re.fullmatch(r"b: 1/4 items \(25%\), 0 s, about 0 s left", out.getvalue().splitlines()[1])
    out = io.StringIO()
    with PlainProgress(every=0, stream=out, budget=50) as bar:  # a pass that stops at a time limit
        task = bar.add_task("b", total=4)
        bar.advance(task)
    lines = out.getvalue().splitlines()
    assert "at most 50 s left (time limit 50 s)" in lines[1]
    assert re.fullmatch(r"b: 1 items in 0 s, done \(time limit 50 s\)", lines[-1]), lines
    out = io.StringIO()
    with PlainProgress(every=0, stream=out, budget=0) as bar:  # over the limit: no "0 s left" forever
        task = bar.add_task("b", total=4)
        bar.advance(task)
    assert "past the time limit of 0 s, finishing the minimum calls per item" in out.getvalue()
    assert fmt_seconds(3725) == "1 h 02 min" and fmt_seconds(125) == "2 min 05 s"



def test_run_log_keeps_text_and_drops_live_frames(tmp_path):
    log = tmp_path / "app.log"
    with run_log(log):
        print("\x1b[1mhwnas search\x1b[0m: done")
        sys.stdout.write("\x1b[2K\x1b[1A\rEpoch 0 ━━━━ 3/17")  # a live bar's frame
        print("error: something", file=sys.stderr)
    assert log.read_text() == "hwnas search: done\nerror: something\n"

