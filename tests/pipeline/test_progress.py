"""The progress line off a terminal: a line every ``every`` seconds, and the closing line once."""

import io

from pipeline._progress import Progress


def test_the_closing_line_is_printed_once_off_a_terminal():
    clock = iter(range(100))
    out = io.StringIO()
    progress = Progress(total=10, stream=out, every=50.0, now=lambda: float(next(clock)))
    progress.update(rows=4, nbytes=0)  # the first line
    progress.in_flight(3)  # within `every`: no line
    progress.update(rows=6, nbytes=0)  # done: the closing line
    progress.in_flight(0)  # late answers from the workers: no more lines
    progress.in_flight(2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "4/10 samples" in lines[0] and "10/10 samples" in lines[1]
