"""Make the repo's GSM8K splits from the shared copy of GSM8K's training split.

    python python/examples/prepare_gsm8k.py [--source ../shared/data/gsm8k/train.jsonl] [--out data/gsm8k]

Writes ``train.jsonl.gz`` (the first 6,973 problems) and ``eval.jsonl.gz`` (the last 500, held out
from tokenizer and model training). Lines are copied verbatim; the gzip header carries no name
and mtime 0, so reruns are byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
DEFAULT_OUT = REPO_ROOT / "data" / "gsm8k"
EVAL_SIZE = 500


def read_lines(source: Path) -> list[str]:
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        if set(record) != {"question", "answer"} or "####" not in record["answer"]:
            raise ValueError(f"{source}:{number}: expected {{'question', 'answer'}} with '####' in the answer")
    return lines


def write_gzip(path: Path, lines: list[str]) -> None:
    payload = "".join(line + "\n" for line in lines).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    lines = read_lines(args.source)
    train, held_out = lines[:-EVAL_SIZE], lines[-EVAL_SIZE:]
    args.out.mkdir(parents=True, exist_ok=True)
    write_gzip(args.out / "train.jsonl.gz", train)
    write_gzip(args.out / "eval.jsonl.gz", held_out)
    print(f"{args.source}: {len(lines)} problems -> train {len(train)}, eval {len(held_out)} in {args.out}")


if __name__ == "__main__":
    main()
