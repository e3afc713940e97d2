"""GSM8K: prompt format, final-answer extraction and the repo's data splits.

The splits (made by ``python/examples/prepare_gsm8k.py``): ``train`` lives in the checkout as
``data/gsm8k/train.jsonl.gz``; ``eval``, the last 500 problems of GSM8K's training split, held out
from tokenizer and model training, ships in the package (``assets/gsm8k/eval.jsonl.gz``). Each line is ``{"question", "answer"}``;
an answer is a short chain of thought ending in ``#### <final number>``.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

PROMPT_FORMAT = "Question:\n{q}\nAnswer:\n"
SPLITS = ("train", "eval")

# After commas and spaces are removed: an optional sign, then digits with an optional fraction.
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


def format_prompt(question: str) -> str:
    """The prompt the teacher and the CLLM are trained and evaluated with."""
    return PROMPT_FORMAT.format(q=question)


def extract_final_answer(text: str) -> str | None:
    """The number after the first ``####`` in ``text``, normalised so that equal answers compare
    equal as strings: commas, spaces and a leading ``$`` removed, a trailing dot stripped, and
    trailing zeros of a fraction dropped (``"1,000."`` -> ``"1000"``, ``"3.50"`` -> ``"3.5"``).
    Anything after the number on that line is ignored. None if there is no ``####`` or no number
    right after it."""
    _, marker, tail = text.partition("####")
    if not marker:
        return None
    line = tail.lstrip(" \t").split("\n", 1)[0]
    compact = re.sub(r"[,\s]", "", line).removeprefix("$")
    match = _NUMBER.match(compact)
    if match is None:
        return None
    number = match.group(0)
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("", "-"):
        return None
    return number


def load_jsonl_gz(path: str | Path) -> list[dict]:
    """All records of a gzipped JSON-lines file, in file order."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def repo_data_path(split: str) -> Path:
    """The path of a GSM8K split.

    ``eval`` (500 held-out problems, 90 kB) ships inside the package
    (``jacobi_engine/assets/gsm8k/eval.jsonl.gz``), so the benchmark and the examples run from
    any install. ``train`` (1.2 MB) ships with the repository only: ``data/gsm8k/train.jsonl.gz``
    of the checkout this package was imported from (an editable install works)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "eval":
        return Path(__file__).resolve().parent / "assets" / "gsm8k" / "eval.jsonl.gz"
    repo_root = Path(__file__).resolve().parent.parent
    path = repo_root / "data" / "gsm8k" / f"{split}.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the GSM8K training split ships with the repository, not the installed "
            "package. Run from a checkout of jacobi-engine (an editable install works), or recreate it with "
            "`python python/examples/prepare_gsm8k.py --out DIR`."
        )
    return path
