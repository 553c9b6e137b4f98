"""apps/hugepages.py: when the command line re-executes itself with glibc's huge-page tunable,
and that the tunable does what it is for (the kernel's own page-fault count is the oracle)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apps.hugepages import TUNABLE, libc_version, thp_mode, tunables_with_hugepages

REPO = Path(__file__).resolve().parents[1]
GLIBC = ("glibc", (2, 36))


@pytest.mark.parametrize("environ,thp,libc,expected", [
    ({}, "madvise", GLIBC, TUNABLE),
    ({}, "always", GLIBC, TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC, f"glibc.malloc.arena_max=2:{TUNABLE}"),  # the user's kept
    ({"GLIBC_TUNABLES": TUNABLE}, "madvise", GLIBC, None),  # set already: the re-executed process stops here
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),  # the user's own choice wins
    ({"RLHF_HUGEPAGES": "0"}, "madvise", GLIBC, None),
    ({}, "never", GLIBC, None),
    ({}, None, GLIBC, None),
    ({}, "madvise", ("glibc", (2, 34)), None),  # the tunable came with 2.35
    ({}, "madvise", None, None),  # not glibc
])
def test_when_the_tunable_is_set(environ, thp, libc, expected):
    assert tunables_with_hugepages(environ, thp, libc) == expected


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(f) == "madvise" and thp_mode(tmp_path / "absent") is None


CHILD = """
import os, resource, sys
from apps.hugepages import reexec_with_hugepages
print("start", os.getpid(), flush=True)
reexec_with_hugepages()
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = torch.empty(64 * 2**20)  # 256 MiB: above malloc's mmap threshold
t.fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print("done", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), faults, sys.argv[1:], sep="|")
"""


@pytest.mark.skipif(thp_mode() != "madvise" or libc_version() is None or libc_version()[1] < (2, 35),
                    reason="needs glibc >= 2.35 and transparent huge pages in madvise mode (with 'always' every process has them)")
def test_the_reexecuted_process_faults_its_tensors_in_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    runs = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", CHILD, "a", "b=1"], cwd=REPO, env={**env, "RLHF_HUGEPAGES": flag},
                             capture_output=True, text=True, timeout=300, check=True).stdout.split("\n")
        starts = [ln for ln in out if ln.startswith("start")]
        done = next(ln for ln in out if ln.startswith("done")).split("|")
        assert len(starts) == (2 if flag == "1" else 1)  # re-executed once: the code before the call ran twice
        assert all(s.split()[1] == done[1] for s in starts)  # same process (exec keeps the PID)
        assert (TUNABLE in done[2]) == (flag == "1") and done[4] == "['a', 'b=1']"  # the arguments survive
        runs[flag] = int(done[3])
    assert runs["0"] >= 60_000  # 4 KiB pages: 65,536 for 256 MiB
    assert runs["1"] < runs["0"] / 8, runs  # 2 MiB pages: about 128
