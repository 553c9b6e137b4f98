"""Progress bars: one line per redraw in a file (no carriage-return walls in run.log), in place on a terminal."""

import io

from rlhf.progress import FILE_INTERVAL, LineWriter, progress_bar


def test_a_file_gets_whole_lines_and_no_carriage_returns():
    out = io.StringIO()
    bar = progress_bar(total=5, desc="prior", unit="step", stream=out)
    assert bar.mininterval == bar.maxinterval == FILE_INTERVAL
    for _ in range(5):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("prior:   0%") and lines[-1].startswith("prior: 100%") and "5/5" in lines[-1]
    assert all(line.strip() for line in lines)


def test_line_writer_drops_empty_redraws():
    out = io.StringIO()
    w = LineWriter(out)
    w.write("\r")
    w.write("\rbar 1/2   ")
    w.write("\n")
    assert out.getvalue() == "bar 1/2\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_redraws_in_place():
    out = Terminal()
    bar = progress_bar(total=3, desc="tune", stream=out, mininterval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in out.getvalue()
