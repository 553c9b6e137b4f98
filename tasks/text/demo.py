"""The synthetic demo data of the text task (``configs/data/text-demo.jsonl``), made here.

Each row asks to repeat or to reverse a short list of words::

    {"prompt": "repeat: red fox moon", "reference": "red fox moon"}
    {"prompt": "reverse: owl sun", "reference": "sun owl"}

A tiny model learns both by MLE, but not perfectly in a few hundred steps, so sentence BLEU
against the reference has room to grow under RL. Regenerate the file with::

    python -m tasks.text.demo configs/data/text-demo.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ("red", "green", "blue", "black", "white", "cat", "dog", "fox", "owl", "sun", "moon", "star")
OPS = ("repeat", "reverse")


def make_rows(n: int = 600, seed: int = 0, min_words: int = 2, max_words: int = 4) -> list[dict[str, str]]:
    """``n`` rows with distinct prompts, half of each operation (in random order)."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        op = OPS[len(rows) % len(OPS)]
        words = rng.sample(WORDS, rng.randint(min_words, max_words))
        prompt = f"{op}: {' '.join(words)}"
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = words if op == "repeat" else words[::-1]
        rows.append({"prompt": prompt, "reference": " ".join(answer)})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSONL file to write")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_jsonl(make_rows(args.rows, args.seed), args.out))


if __name__ == "__main__":
    main()
