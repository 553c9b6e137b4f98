"""Progress bars that read well in a terminal and in a log file.

On a terminal a bar redraws in place (tqdm's carriage returns). Written to a file or a pipe
(``run.log`` under ``nohup``, CI logs), carriage returns would join every redraw into one
endless line; there each redraw becomes its own line, at most one per ``FILE_INTERVAL`` seconds.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, TextIO

from tqdm.auto import tqdm

FILE_INTERVAL = 30.0  # seconds between lines when the output is not a terminal


class LineWriter:
    """A text stream for tqdm that writes each redraw as one line: ``"\\rbar   "`` → ``"bar\\n"``."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> int:
        line = s.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, *, stream: TextIO | None = None, **kw: Any) -> tqdm:
    """``tqdm(iterable, **kw)`` on ``stream`` (default stderr): in place on a terminal, one line
    per ``FILE_INTERVAL`` seconds otherwise."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, mininterval=kw.pop("mininterval", 0.1), **kw)
    kw.pop("dynamic_ncols", None)  # no terminal to size to
    # maxinterval: tqdm's monitor thread would otherwise force a redraw every 10 s
    return tqdm(iterable, file=LineWriter(stream), mininterval=FILE_INTERVAL, maxinterval=FILE_INTERVAL, ncols=100, **kw)
