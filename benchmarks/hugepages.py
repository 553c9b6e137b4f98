"""What huge pages buy a CPU training step (apps/hugepages.py).

The workload is the heavy half of a translation RL update: hidden states [rows, T, d] through
an output projection to the vocabulary, log-softmax, the chosen tokens' log-probs and the
backward pass, ``--repeats`` times. Each allocation of logits and gradients is larger than
glibc's mmap threshold, so without huge pages every step faults its memory in 4 KiB at a time.
The same workload runs in two fresh processes, one with ``RLHF_HUGEPAGES=0`` and one under
``glibc.malloc.hugetlb=1`` (interleaved, ``--rounds`` times, best kept). Times are the child's
CPU seconds, user and system (page faults, and the other cores' TLB flushes when memory is
returned, are system time), from ``getrusage``, with torch on every core as in training.
Prints one JSON line.

    python benchmarks/hugepages.py [--rows 32] [--len 64] [--vocab 8000] [--repeats 5] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, os, resource, sys
from apps.hugepages import reexec_with_hugepages
reexec_with_hugepages()
import torch
rows, length, vocab, repeats, threads = map(int, sys.argv[1:6])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
h = torch.randn(rows, length, 256, generator=g)
w = torch.randn(256, vocab, generator=g, requires_grad=True)
tok = torch.randint(vocab, (rows, length), generator=g)
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(repeats):
    logp = (h.reshape(-1, 256) @ w).log_softmax(-1).gather(-1, tok.reshape(-1, 1))  # [rows·T, 1]
    logp.mean().backward()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime, "faults": r1.ru_minflt - r0.ru_minflt,
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""


def run(flag: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["RLHF_HUGEPAGES"] = flag
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, (args.rows, args.len, args.vocab, args.repeats, args.threads))], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core, as training runs)")
    args = ap.parse_args()
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for flag in ("0", "1"):
            r = run(flag, args)
            if flag not in best or r["user_s"] + r["sys_s"] < best[flag]["user_s"] + best[flag]["sys_s"]:
                best[flag] = r
    plain, huge = best["0"], best["1"]
    cpu = lambda r: r["user_s"] + r["sys_s"]  # noqa: E731
    print(json.dumps({"bench": "hugepages", "threads": args.threads, "rows": args.rows, "len": args.len, "vocab": args.vocab, "repeats": args.repeats,
                      "huge_pages_on": bool(huge["tunables"]),
                      "cpu_s_4k": round(cpu(plain), 3), "sys_s_4k": round(plain["sys_s"], 3), "faults_4k": plain["faults"],
                      "cpu_s_huge": round(cpu(huge), 3), "sys_s_huge": round(huge["sys_s"], 3), "faults_huge": huge["faults"],
                      "speedup": round(cpu(plain) / cpu(huge), 2)}))


if __name__ == "__main__":
    main()
