"""Labels in SQLite: every label committed before the web app answers, several raters at once.

Tables::

    labels(pair_id, rater, choice, created_at, updated_at, revision)   PRIMARY KEY (pair_id, rater)
    events(seq, pair_id, rater, choice, at)                              append-only log of every post

``choice`` is ``A``, ``B``, ``tie`` or ``skip``. Relabelling (documented choice): a rater has one
current label per pair; posting again updates ``choice`` and ``updated_at`` and bumps
``revision``, while ``created_at`` keeps the first time and ``events`` keeps the history.

Durability: WAL journal, ``synchronous=FULL`` (a commit is on disk before it returns), one
connection per call (safe from any thread), writes in ``BEGIN IMMEDIATE`` transactions so
concurrent writers queue on the lock (``busy_timeout``) instead of failing.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlhf.errors import UserError

CHOICES = ("A", "B", "tie", "skip")
SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    pair_id    TEXT NOT NULL,
    rater      TEXT NOT NULL,
    choice     TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    revision   INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (pair_id, rater)
);
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    pair_id TEXT NOT NULL,
    rater   TEXT NOT NULL,
    choice  TEXT NOT NULL,
    at      TEXT NOT NULL
);
-- Why: every post answers with the rater's progress, a per-rater read; without this covering
-- index it scans every rater's rows, so a session slows down as it grows (8 raters x 1,000 labels).
CREATE INDEX IF NOT EXISTS labels_by_rater ON labels (rater, pair_id, choice);
"""


@dataclass(frozen=True)
class Label:
    pair_id: str
    rater: str
    choice: str
    created_at: str
    updated_at: str
    revision: int


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z`` (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LabelStore:
    """The SQLite file of one labelling session (see the module docstring)."""

    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder; give --db a file name such as labels.sqlite.")
        if not self.path.parent.is_dir():
            raise UserError(f"{self.path}: folder {self.path.parent} does not exist; create it first.")
        try:
            with closing(self._raw()) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: not a usable SQLite label database ({e}); give a new file name to start afresh.") from None

    def _raw(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits implicitly
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def put(self, pair_id: str, rater: str, choice: str, at: str | None = None) -> Label:
        """Insert or update the rater's label of a pair and log the event, in one transaction
        committed (and synced) before returning."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        at = at or utc_now()
        with closing(self._raw()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO labels (pair_id, rater, choice, created_at, updated_at, revision) VALUES (?, ?, ?, ?, ?, 1) "
                    "ON CONFLICT (pair_id, rater) DO UPDATE SET choice = excluded.choice, updated_at = excluded.updated_at, "
                    "revision = labels.revision + 1",
                    (pair_id, rater, choice, at, at),
                )
                conn.execute("INSERT INTO events (pair_id, rater, choice, at) VALUES (?, ?, ?, ?)", (pair_id, rater, choice, at))
                row = conn.execute("SELECT pair_id, rater, choice, created_at, updated_at, revision FROM labels WHERE pair_id = ? AND rater = ?",
                                   (pair_id, rater)).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return Label(*row)

    def labels(self, rater: str | None = None) -> list[Label]:
        """Current labels (all raters, or one), in the order they were first given."""
        q = "SELECT pair_id, rater, choice, created_at, updated_at, revision FROM labels"
        args: tuple = ()
        if rater is not None:
            q += " WHERE rater = ?"
            args = (rater,)
        with closing(self._raw()) as conn:
            return [Label(*r) for r in conn.execute(q + " ORDER BY created_at, rowid", args)]

    def label(self, pair_id: str, rater: str) -> Label | None:
        with closing(self._raw()) as conn:
            row = conn.execute("SELECT pair_id, rater, choice, created_at, updated_at, revision FROM labels WHERE pair_id = ? AND rater = ?",
                               (pair_id, rater)).fetchone()
        return Label(*row) if row else None

    def choices(self, rater: str) -> dict[str, str]:
        """The rater's current choice per pair id: what progress counts need, read from the
        covering index without building :class:`Label` rows or sorting (it runs on every post)."""
        with closing(self._raw()) as conn:
            return dict(conn.execute("SELECT pair_id, choice FROM labels WHERE rater = ?", (rater,)))

    def done(self, rater: str) -> set[str]:
        """Pair ids the rater has labelled or skipped."""
        with closing(self._raw()) as conn:
            return {r[0] for r in conn.execute("SELECT pair_id FROM labels WHERE rater = ?", (rater,))}

    def counts(self) -> dict[str, int]:
        """Rows in ``labels`` and ``events`` (for tests and the export summary)."""
        with closing(self._raw()) as conn:
            return {"labels": conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0],
                    "events": conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]}
