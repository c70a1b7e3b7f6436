"""What writing one top-k answer as JSON costs: dicts through the encoder against TopKJson's pieces.

    python scripts/answer_json.py [--labels 1000] [--k 5,3] [--batch 32]

Random top-k answers over ``--labels`` classes, written both ways (checked equal), timed in
process; prints CPU microseconds per answer and the host's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servekit.batch import encode_answer  # noqa: E402
from servekit.classify import ImageClassifier, TopKJson  # noqa: E402


def per_answer_us(fn, answers: int, calls: int = 2000, repeats: int = 7) -> float:
    """The best of ``repeats`` runs of ``calls`` calls, in CPU microseconds per answer."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, time.process_time() - t)
    return round(best / calls / answers * 1e6, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--k", default="5,3")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    labels = [f"class {i}" for i in range(args.labels)]
    dicts = ImageClassifier.__new__(ImageClassifier)  # format() reads only the labels
    dicts.labels = labels
    pieces = TopKJson(labels)
    rng = random.Random(0)
    rows = {}
    for k in (int(x) for x in args.k.split(",")):
        items = [
            (rng.sample(range(args.labels), k), sorted((rng.random() for _ in range(k)), reverse=True))
            for _ in range(args.batch)
        ]
        old = lambda items=items: [encode_answer(dicts.format(i, q)) for i, q in items]  # noqa: E731
        new = lambda items=items: [pieces.encode(i, q) for i, q in items]  # noqa: E731
        assert old() == new(), "the two ways disagree"
        rows[f"top{k}"] = {
            "dicts_encoder_us": per_answer_us(old, args.batch),
            "topk_json_us": per_answer_us(new, args.batch),
        }
    print(json.dumps({"cpu": os.cpu_count(), "labels": args.labels, "per_answer": rows}, indent=1))


if __name__ == "__main__":
    main()
