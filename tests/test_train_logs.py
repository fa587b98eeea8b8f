"""Training logs in a terminal and in a batch job (issue #22, items 2 and 8): one plain line per
log step (step, loss, lr, tokens/s, MFU %, ETA) when the output is not a terminal, the progress
bar with MFU on a terminal, and the warmup > max_steps warning."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import termios


from miras_pretrain.train.loop import Console, format_duration

ROW = {"train/loss": 5.4321, "train/lr": 3e-3, "train/tokens_per_s": 1234.5, "train/mfu": 0.0123}


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _run(console: Console, steps: int, interval: int, clock: FakeClock | None = None) -> None:
    for step in range(1, steps + 1):
        if clock is not None:
            clock.t += 2.0
        console.advance()
        if step % interval == 0:
            console.report(step, ROW)
    console.say("step 60: val loss 5.0000  ppl 148.41")
    console.close()


def test_not_a_terminal_gives_plain_lines():
    bar_stream, out = io.StringIO(), io.StringIO()  # StringIO.isatty() is False: a batch job's log
    console = Console.open(enabled=True, progress_bar=True, total=60, initial=0, desc="run",
                           stream=bar_stream, out=out)
    assert not console.has_bar
    _run(console, 60, 10)
    text = out.getvalue()
    assert bar_stream.getvalue() == "" and "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 7 and lines[-1].startswith("step 60: val loss")
    assert lines[0].startswith("step 10/60  loss 5.4321  lr 3.000e-03  1,234 tok/s  MFU 1.23%  ETA ")
    assert all(l.startswith(f"step {10 * (i + 1)}/60  loss") for i, l in enumerate(lines[:6]))
    assert lines[5].endswith("ETA 0:00:00")
    assert len(text) < 600  # 60 steps: six lines, not kilobytes of redraws


def test_eta_from_the_pace_of_this_job():
    clock = FakeClock()
    out = io.StringIO()
    console = Console(None, True, total=100, initial=40, out=out, clock=clock)
    clock.t += 30.0  # 10 steps in 30 s -> 50 steps left = 150 s
    console.report(50, ROW)
    assert out.getvalue().rstrip().endswith("ETA 0:02:30")
    assert format_duration(float("nan")) == "?" and format_duration(3725) == "1:02:05"


def test_bar_turned_off_still_logs_the_loss():
    out = io.StringIO()
    console = Console.open(enabled=True, progress_bar=False, total=4, initial=0, desc="run",
                           stream=io.StringIO(), out=out)
    _run(console, 4, 2)
    assert [l.split("  ")[0] for l in out.getvalue().splitlines()[:2]] == ["step 2/4", "step 4/4"]


def test_quiet_console_prints_nothing():
    out = io.StringIO()
    console = Console.open(enabled=False, progress_bar=True, total=4, initial=0, desc="run",
                           stream=io.StringIO(), out=out)
    _run(console, 4, 1)
    assert out.getvalue() == ""


def test_terminal_keeps_the_bar_and_shows_mfu():
    master, slave = pty.openpty()
    # a fresh pty is 0 x 0: give it a terminal's size, or tqdm's dynamic width draws nothing
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    stream = os.fdopen(slave, "w")
    try:
        console = Console.open(enabled=True, progress_bar=True, total=20, initial=0, desc="run",
                               stream=stream, out=stream)
        assert console.has_bar
        _run(console, 20, 5)
        stream.flush()
        chunks = []
        # poll, not select: select() cannot watch a descriptor numbered 1024 or more, and a long
        # pytest session can hand the pty such a number
        poller = select.poll()
        poller.register(master, select.POLLIN)
        while poller.poll(200):
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        stream.close()
        os.close(master)
    drawn = b"".join(chunks).decode(errors="replace")
    assert "\r" in drawn and "20/20" in drawn  # a redrawn bar
    assert "mfu=1.23%" in drawn and "loss=5.432" in drawn and "tok_s=1234" in drawn
    # messages are written around the bar (tqdm.write); no plain log lines next to a bar
    assert "step 60: val loss 5.0000  ppl 148.41" in drawn and "step 5/20  loss" not in drawn


def test_stdout_to_a_file_gets_plain_lines_even_with_a_terminal_bar_stream():
    """`train > log.txt` from a terminal: stderr is a terminal, stdout is not -> plain lines."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    out = io.StringIO()
    try:
        console = Console.open(enabled=True, progress_bar=True, total=4, initial=0, desc="run",
                               stream=stream, out=out)
        assert not console.has_bar
        _run(console, 4, 2)
    finally:
        stream.close()
        os.close(master)
    assert out.getvalue().startswith("step 2/4  loss 5.4321")


def test_warmup_longer_than_the_run_warns_once(capsys, monkeypatch):
    from miras_pretrain.train import config

    monkeypatch.setattr(config, "_warned", set())
    monkeypatch.delenv("RANK", raising=False)
    for _ in range(2):  # the demo and the trainer load a config several times: one line
        config.config_from_dict({"train": {"max_steps": 50, "warmup_steps": 100}})
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: train.warmup_steps=100 is larger than train.max_steps=50: the lr never reaches "
                   "train.lr and never decays; lower train.warmup_steps"]
    config.config_from_dict({"train": {"max_steps": 50, "warmup_steps": 50}})
    monkeypatch.setenv("RANK", "1")  # other ranks stay quiet
    config.config_from_dict({"train": {"max_steps": 5, "warmup_steps": 100}})
    assert capsys.readouterr().err == ""
