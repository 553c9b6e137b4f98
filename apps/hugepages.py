"""Large CPU tensors in transparent huge pages.

glibc's malloc serves every allocation above 32 MiB (a batch's logits [B, T, V], its
activations) with fresh ``mmap``'d memory and returns it on ``free``, so the kernel faults the
next one in again, 4 KiB at a time. A translation RL iteration (1,024 samples, 8,000-token
vocabulary) took 130,000 page faults a second that way, with more CPU time in the kernel than in
PyTorch. glibc ≥ 2.35 asks for 2 MiB pages for those mappings when ``GLIBC_TUNABLES`` holds
``glibc.malloc.hugetlb=1`` (glibc manual, "Memory Allocation Tunables"), where the kernel's
transparent huge pages are on (``always`` or ``madvise``). glibc reads the tunable at process
start only, so the command line re-executes itself once with it set (same PID, same arguments).
``RLHF_HUGEPAGES=0`` turns this off; ``benchmarks/hugepages.py`` measures it on one projection,
``benchmarks/tune_iteration_time.py --hugepages 0 1`` on whole RL iterations.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), None if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def libc_version() -> tuple[str, tuple[int, int]] | None:
    """("glibc", (major, minor)) from ``confstr``, None elsewhere (musl, macOS, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = version.split(".")[:2]
        return name, (int(major), int(minor))
    except (AttributeError, ValueError, OSError, TypeError):
        return None


def tunables_with_hugepages(environ: Mapping[str, str], thp: str | None, libc: tuple[str, tuple[int, int]] | None) -> str | None:
    """The ``GLIBC_TUNABLES`` value to re-execute with, or None when there is nothing to do: turned
    off, no transparent huge pages, not glibc ≥ 2.35, or the tunable already set (by the user,
    or by the re-execution itself, which ends the loop)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if environ.get("RLHF_HUGEPAGES", "1") == "0" or thp not in ("always", "madvise") or "glibc.malloc.hugetlb" in current:
        return None
    if libc is None or libc[0] != "glibc" or libc[1] < (2, 35):
        return None
    return f"{current}:{TUNABLE}" if current else TUNABLE


def set_tunable() -> bool:
    """Put the tunable into this process's environment (for what it starts next), when
    :func:`tunables_with_hugepages` says so; True when it did."""
    value = tunables_with_hugepages(os.environ, thp_mode(), libc_version())
    if value is not None:
        os.environ["GLIBC_TUNABLES"] = value
    return value is not None


def reexec_with_hugepages() -> None:
    """Replace this process with itself under the tunable, when :func:`set_tunable` set it; call
    before anything heavy is imported."""
    if not set_tunable():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # orig_argv keeps -m/-c and the script path


if __name__ == "__main__":  # python -m apps.hugepages ARGS: python ARGS under the tunable (make test runs pytest so)
    set_tunable()
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
