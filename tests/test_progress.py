"""memoryformer.progress: timed lines when output is not a terminal, nothing when disabled."""

import io

from memoryformer.progress import Progress, _format_seconds


def test_timed_lines_in_a_log():
    log = io.StringIO()
    with Progress(total=10, desc="train", unit="steps", every_s=0, file=log, terminal=False) as bar:
        for _ in range(4):
            bar.update(1, tokens=100, loss=2.5)
    lines = log.getvalue().splitlines()
    assert len(lines) == 5  # one per update (every_s=0) and the closing line
    assert lines[-1].startswith("train: 4/10 steps (40.0%)")
    assert "tokens/s" in lines[-1] and "ETA" in lines[-1] and "loss 2.5000" in lines[-1]


def test_interval_limits_lines_and_disabled_prints_nothing():
    log = io.StringIO()
    with Progress(total=None, desc="eval", every_s=3600, file=log, terminal=False) as bar:
        bar.update(3)
    assert len(log.getvalue().splitlines()) == 1  # no line within the interval, one at close
    assert log.getvalue().startswith("eval: 3 it")
    quiet = io.StringIO()
    with Progress(total=5, desc="x", enabled=False, every_s=0, file=quiet, terminal=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_format_seconds():
    assert (_format_seconds(5), _format_seconds(125), _format_seconds(3 * 3600 + 61)) == ("5s", "2m05s", "3h01m")
