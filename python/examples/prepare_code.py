"""Build the Python-code domain: prompts from the standard library's functions, whole modules held out.

    python python/examples/prepare_code.py --out data/code

For every function and method with a docstring in the standard library source of the Python that
runs this script (``sysconfig.get_paths()["stdlib"]``; test suites, ``site-packages``,
``pydoc_data`` and ``__pycache__`` left out):

* prompt = the ``def`` line(s) (signature, without decorators) through the end of the docstring,
  dedented to column 0, plus a newline;
* answer = the rest of the body (comments included), dedented by the same amount, plus a newline.

Examples whose prompt exceeds ``--max-prompt-chars`` or whose body exceeds ``--max-body-chars`` (or
is empty) are skipped, and exact duplicates (same prompt and answer) are kept once.

Split: by top-level module or package (``email`` covers ``email/mime/text.py``), never by
function, so no held-out code shares a file or package with training code. Top-level names are
ordered by their sha256 and taken for eval in that order until eval holds at least
``--eval-fraction`` (8%) of the examples; the rest is train. The order depends only on the
names; the examples (and so where the cut falls) depend on the Python version's stdlib, which
``split.json`` records with the held-out names and the counts.

Writes OUT/train.jsonl.gz and OUT/eval.jsonl.gz (``{"prompt", "answer", "module", "qualname",
"file", "line"}`` per line, in file order) and OUT/split.json.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import platform
import sys
import sysconfig
from pathlib import Path

SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data", "__pycache__"}


def held_out_names(counts: dict[str, int], eval_fraction: float) -> set[str]:
    """Top-level names, in sha256 order, until they hold ``eval_fraction`` of the examples."""
    total, chosen, held = sum(counts.values()), set(), 0
    for name in sorted(counts, key=lambda name: hashlib.sha256(name.encode()).hexdigest()):
        if held >= eval_fraction * total:
            break
        chosen.add(name)
        held += counts[name]
    return chosen


def source_files(stdlib: Path) -> list[Path]:
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(part in SKIPPED_PARTS or part.startswith("test_") for part in parts):
            continue
        files.append(path)
    return files


def _functions(tree: ast.AST):
    """(qualified name, node) of every function and method, nested ones included."""
    stack = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                stack.append((name + ".", child))


def examples_of_file(path: Path, relative: str, max_prompt_chars: int, max_body_chars: int) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = text.splitlines()
    examples = []
    for qualname, node in _functions(tree):
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        docstring_end = node.body[0].end_lineno  # 1-based, inclusive
        head = lines[node.lineno - 1 : docstring_end]
        body = lines[docstring_end : node.end_lineno]
        if not any(line.strip() for line in body):
            continue
        indent = len(head[0]) - len(head[0].lstrip())
        if any(line.strip() and len(line) - len(line.lstrip()) < indent for line in head + body):
            continue  # a continuation line left of the def: dedenting would change the code
        prompt = "\n".join(line[indent:] for line in head) + "\n"
        answer = "\n".join(line[indent:] for line in body).rstrip() + "\n"
        if len(prompt) > max_prompt_chars or len(answer) > max_body_chars:
            continue
        examples.append(
            {
                "prompt": prompt,
                "answer": answer,
                "module": relative.removesuffix(".py").replace("/", ".").removesuffix(".__init__"),
                "qualname": qualname,
                "file": relative,
                "line": node.lineno,
            }
        )
    return sorted(examples, key=lambda example: example["line"])


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    # mtime=0: the same records give the same bytes on every run.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--eval-fraction", type=float, default=0.08, help="share of the examples held out (0.08)")
    parser.add_argument("--max-prompt-chars", type=int, default=1200)
    parser.add_argument("--max-body-chars", type=int, default=1000)
    args = parser.parse_args(argv)
    if not 0.0 < args.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if not args.stdlib.is_dir():
        raise ValueError(f"--stdlib {args.stdlib} is not a directory")

    by_top_level: dict[str, list[dict]] = {}
    seen = set()
    for path in source_files(args.stdlib):
        relative = path.relative_to(args.stdlib).as_posix()
        top_level = relative.split("/")[0].removesuffix(".py")
        for example in examples_of_file(path, relative, args.max_prompt_chars, args.max_body_chars):
            key = (example["prompt"], example["answer"])
            if key not in seen:
                seen.add(key)
                by_top_level.setdefault(top_level, []).append(example)
    held_out = held_out_names({name: len(examples) for name, examples in by_top_level.items()}, args.eval_fraction)
    splits = {"train": [], "eval": []}
    for name in sorted(by_top_level):
        splits["eval" if name in held_out else "train"].extend(by_top_level[name])
    top_levels = {"eval": held_out, "train": set(by_top_level) - held_out}
    args.out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        write_jsonl_gz(args.out / f"{split}.jsonl.gz", records)
    summary = {
        "command": "python " + " ".join(sys.argv),
        "python": platform.python_version(),
        "stdlib": str(args.stdlib),
        "rule": "top-level module/package names in sha256(name) order go to eval until eval holds "
        f">= {args.eval_fraction:.0%} of the examples",
        "examples": {split: len(records) for split, records in splits.items()},
        "body_chars": {split: sum(len(r["answer"]) for r in records) for split, records in splits.items()},
        "eval_top_levels": sorted(top_levels["eval"]),
        "train_top_levels": len(top_levels["train"]),
    }
    (args.out / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({key: value for key, value in summary.items() if key != "eval_top_levels"}, indent=1))
    print("held out:", " ".join(summary["eval_top_levels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
