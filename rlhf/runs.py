"""Run folders: resolved config, metrics JSONL, log file, atomic Hugging Face checkpoints.

Layout of a run folder::

    <run_dir>/
      config.yaml            resolved config (after overrides)
      metrics.jsonl          one JSON object per logged step, namespaced keys (see docs/metrics.md)
      tracking/<stage>/      the same rows for TensorBoard (log_with: [tensorboard])
      run.log                the log
      checkpoints/<stage>/step-000123/   save_pretrained (safetensors) + tokenizer + trainer_state.pt
      report.md, plots/*.png, samples/  written by the report
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence


from rlhf.config import RunSettings, dump_config
from rlhf.errors import UserError

log = logging.getLogger("rlhf")

_STEP_DIR = re.compile(r"^step-(\d+)$")


# errno of a storage fault that a user fixes outside the program: a full disk or quota, a file
# too large for the file system or the process limit, a read-only file system, no permission
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
_RUST_IO = re.compile(r"(?:os error |Os \{ code: )(\d+)")  # how safetensors (Rust) reports an OS error


def storage_error(e: BaseException, path: Path) -> OSError | None:
    """``e`` as an OSError naming ``path`` when it is a storage fault, else None. Libraries
    report these in their own words: torch.save raises a RuntimeError while handling the
    OSError, safetensors a SafetensorError with "os error N" in its message."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        code = cause.errno if isinstance(cause, OSError) else (int(m.group(1)) if (m := _RUST_IO.search(str(cause))) else None)
        if code in STORAGE_ERRNOS:
            return OSError(code, os.strerror(code), str(getattr(cause, "filename", None) or path))
        cause = cause.__cause__ or cause.__context__
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise (storage_error(e, path) or e) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise (storage_error(e, path) or e) from None


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory with ``write(tmp)`` then rename it to ``target``.

    A crash mid-write leaves only a ``.tmp-*`` directory, which ``latest_checkpoint`` ignores.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    except OSError as e:
        raise (storage_error(e, target) or e) from None
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fault = storage_error(e, target)
        if fault is None:
            raise
        raise fault from None
    return target


class MetricsLogger:
    """Appends one JSON line per call to ``metrics.jsonl``; keys are namespaced (``loss/train``).
    Each row also goes to the experiment trackers named in ``trackers`` (accelerate's tracker
    classes), one tracker run per stage, so a stage resumed at step k is purged past k there too."""

    def __init__(self, path: Path, enabled: bool = True, trackers: Sequence[str] = ()):
        self.path = path
        self.enabled = enabled
        self.trackers = list(trackers)
        self._started: dict[str, list[Any]] = {}  # stage -> its started accelerate trackers
        self._resumed_at: dict[str, int] = {}  # stage -> the step it was resumed from (truncate)

    def log(self, step: int, metrics: dict[str, float], stage: str) -> None:
        if not self.enabled:
            return
        row = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
        line = json.dumps(row) + "\n"
        try:
            with self.path.open("a", encoding="utf-8") as f:
                end = f.tell()
                try:
                    f.write(line)
                    f.flush()
                except OSError:
                    f.truncate(end)  # a full disk must not leave a torn last line
                    raise
        except OSError as e:
            raise (storage_error(e, self.path) or e) from None
        scalars = {k: v for k, v in row.items() if k in metrics and isinstance(v, float)}
        for tracker in self._stage_trackers(stage):
            tracker.log(scalars, step=step)

    def _stage_trackers(self, stage: str) -> list[Any]:
        if stage not in self._started and self.trackers:
            from accelerate.tracking import LOGGER_TYPE_TO_CLASS

            root, purge = self.path.parent, self._resumed_at.get(stage)
            started = []
            for name in self.trackers:
                args, kwargs = _TRACKER_ARGS[name](root, stage, purge)
                tracker = LOGGER_TYPE_TO_CLASS[name](*args, **kwargs)
                tracker.start()
                started.append(tracker)
            self._started[stage] = started
            atexit.register(self.close)
        return self._started.get(stage, [])

    def close(self) -> None:
        """Flush and close the trackers (idempotent)."""
        for trackers in self._started.values():
            for tracker in trackers:
                tracker.finish()
        self._started.clear()

    def truncate(self, stage: str, step: int) -> None:
        """Drop rows of ``stage`` logged after ``step``: on resume they are recomputed."""
        self._resumed_at[stage] = step
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if not (r.get("stage") == stage and r.get("step", 0) > step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


# name -> (args, kwargs) of its accelerate tracker class for one stage of the run folder ``root``;
# TensorBoard's purge_step drops events at or past the resumed step, as truncate() does here.
_TRACKER_ARGS: dict[str, Callable[[Path, str, int | None], tuple[tuple[Any, ...], dict[str, Any]]]] = {
    "tensorboard": lambda root, stage, resumed: ((stage, root / "tracking"), {"purge_step": None if resumed is None else resumed + 1}),
    "wandb": lambda root, stage, resumed: ((root.resolve().name,), {"name": stage, "dir": str(root)}),
    "mlflow": lambda root, stage, resumed: ((root.resolve().name, str(root / "tracking")), {"run_name": stage}),
}


def read_metrics(path: Path, stage: str | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]


_LOCKS: dict[Path, Any] = {}  # run folder -> the open lock file this process holds (released when the process ends)
LOCK_FILE = ".lock"


def lock_run_folder(root: Path) -> None:
    """Hold an exclusive lock on ``root`` for the rest of this process, so two commands never
    write one run folder at once (their checkpoints and metrics would interleave). The kernel
    drops the lock when the process ends, however it ends (a kill -9 included), so a crashed run
    never leaves a stale lock. Raises UserError naming the holder when another process has it."""
    key = root.resolve()
    if key in _LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    f = (root / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # e.g. ENOLCK on a file system without locks
            log.warning("%s: could not lock the run folder (%s); continuing without the one-writer check", root, e)
            f.close()
            return
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{root}: run folder is in use by {holder}. Wait for it to finish, or pass run_dir=<another folder> "
                        "(or --out for rlhf evaluate).") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} ({' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}), "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _LOCKS[key] = f


def release_run_folder(root: Path) -> None:
    """Drop this process's lock on ``root`` (before deleting the folder)."""
    f = _LOCKS.pop(root.resolve(), None)
    if f is not None:
        f.close()


def release_run_folders() -> None:
    """Drop every run-folder lock this process holds (a command has finished)."""
    for root in list(_LOCKS):
        release_run_folder(root)


class _QuietFileHandler(logging.FileHandler):
    """``run.log``'s handler. The log is a copy of the console: when the disk is full its
    write fails quietly, and the checkpoint or metrics write that also fails reports the
    fault as one error line (logging's default prints a traceback per record)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class Run:
    """A run folder. Only the main process writes (``is_main``), so it is safe under a launcher;
    it holds the folder's lock (:func:`lock_run_folder`) while it lives."""

    def __init__(self, root: str | Path, is_main: bool | None = None):
        from rlhf.distributed import env_rank

        self.root = Path(root)
        self.is_main = env_rank() == 0 if is_main is None else is_main  # default: rank 0 under a launcher
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            lock_run_folder(self.root)
        self.metrics = MetricsLogger(self.root / "metrics.jsonl", enabled=self.is_main)
        self.mixed_precision: str | None = None  # configure(): the run's training precision (TrainLoop's accelerator)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def configure(self, cfg: RunSettings) -> None:
        """Write the resolved config into the folder and take its run-wide settings: the
        trackers that mirror ``metrics.jsonl`` and the training precision."""
        self.metrics.trackers = list(cfg.log_with)
        self.mixed_precision = cfg.mixed_precision
        if self.is_main:
            atomic_write_text(self.root / "config.yaml", dump_config(cfg))

    def attach_log(self) -> None:
        """Send the ``rlhf`` logger to ``run.log`` (in addition to the console)."""
        if not self.is_main:
            return
        path = str((self.root / "run.log").resolve())
        if any(getattr(h, "baseFilename", None) == path for h in log.handlers):
            return
        handler = _QuietFileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)

    def stage_dir(self, stage: str) -> Path:
        return self.checkpoints / stage

    def checkpoint_dir(self, stage: str, step: int) -> Path:
        return self.stage_dir(stage) / f"step-{step:06d}"

    def latest_checkpoint(self, stage: str) -> Path | None:
        return latest_checkpoint(self.stage_dir(stage))

    def discard_partial(self, stage: str) -> list[Path]:
        """Remove the half-written checkpoint folders (``.tmp-*``) a crash left in ``stage``'s
        folder. Safe while this process holds the run folder's lock: no one else writes there."""
        d = self.stage_dir(stage)
        partial = [p for p in d.iterdir() if p.name.startswith(".tmp-")] if d.is_dir() else []
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        return partial

    def final_model_dir(self, stage: str) -> Path:
        """Where the finished model of a stage lives (a plain HF model folder)."""
        return self.root / "models" / stage


def latest_checkpoint(stage_dir: Path) -> Path | None:
    if not stage_dir.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in stage_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def prune_checkpoints(stage_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step folders."""
    steps = sorted((int(m.group(1)), p) for p in stage_dir.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


_FRESH: list[Path] = []  # run folders this process started from nothing: discard_stubs() may remove them
STUB_FILES = {"config.yaml", "run.log", "metrics.jsonl", LOCK_FILE}  # what open_run and the logger write before any result


def discard_stubs() -> list[Path]:
    """Remove the run folders this process started that hold nothing but the config, the log
    and no metrics: what a command that failed before any result leaves. The next try then
    needs no ``--overwrite``. Returns the folders removed."""
    removed = []
    for root in _FRESH:
        files = [f for f in root.rglob("*") if f.is_file()] if root.is_dir() else None
        if files is None or any(f.parent != root or f.name not in STUB_FILES or (f.name == "metrics.jsonl" and f.stat().st_size) for f in files):
            continue
        for h in [h for h in log.handlers if getattr(h, "baseFilename", None) == str((root / "run.log").resolve())]:
            log.removeHandler(h)
            h.close()
        release_run_folder(root)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    _FRESH.clear()
    return removed


def output_run(root: str | Path) -> Run:
    """The run folder of a command that adds to a folder rather than starting a run (``rlhf
    tune``, ``rlhf evaluate --out``): no resume/overwrite rules, but a folder it creates counts
    as fresh, so a failure before any result removes it (:func:`discard_stubs`)."""
    root = Path(root)
    fresh = not root.exists() or not any(root.iterdir())
    run = Run(root)
    if run.is_main and fresh:
        _FRESH.append(root)
    return run


def open_run(cfg: RunSettings, *, resume: bool, overwrite: bool) -> Run:
    """The run folder ``cfg.run_dir``, refusing to mix two runs: an existing non-empty folder
    needs ``resume`` (continue it) or ``overwrite`` (delete it first). Writes the resolved config."""
    root = Path(cfg.run_dir)  # type: ignore[attr-defined]
    fresh = not root.exists() or not any(root.iterdir())
    run = Run(root)
    if run.is_main and not fresh and not resume:  # under a launcher: rank 0 checks and clears
        if not overwrite:
            raise UserError(f"{root}: run folder already exists. Pass --resume to continue it, --overwrite to start afresh, or run_dir=<new folder>.")
        release_run_folder(root)
        shutil.rmtree(root)
        run, fresh = Run(root), True
    if run.is_main and fresh:
        _FRESH.append(root)
    run.attach_log()
    run.configure(cfg)
    return run
