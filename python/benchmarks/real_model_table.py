"""The README's real-model table: the float32 and bfloat16 runs of ``real_model.sh`` side by side.

    python python/benchmarks/real_model_table.py [--fp32 F] [--bf16 F]

Reads the two JSON files ``bench_generate.py`` wrote and prints one Markdown table, a row per
(method, model) of the eager runs, every number as it is in the files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"teacher": "SmolLM2-135M", "cllm": "its CLLM"}


def rows_by_key(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    return {(r["method"], r["model"]): r for r in data["rows"] if not r["compile"]}


def table(fp32: dict, bf16: dict) -> str:
    header = (
        "| method | model | fp32 tokens/forward | fp32 tokens/s | fp32 vs own HF greedy | bf16 tokens/forward "
        "| bf16 tokens/s | bf16 vs own HF greedy | bf16 vs own prompt lookup "
        "| bf16 agreement with bf16 / fp32 HF greedy |"
    )
    lines = [header, "|" + "---|" * 10]
    keys = list(fp32) + [k for k in bf16 if k not in fp32]
    keys.sort(key=lambda k: (k[1] != "teacher", list(fp32).index(k) if k in fp32 else len(fp32)))

    def cells(row, fields):
        if row is None:
            return ["-"] * len(fields)
        return [fmt.format(row[name]) if row.get(name) is not None else "-" for name, fmt in fields]

    for key in keys:
        a, b = fp32.get(key), bf16.get(key)
        left = cells(
            a, [("tokens_per_forward", "{:.2f}"), ("tokens_per_s", "{:.1f}"), ("speedup_vs_own_greedy", "{:.2f}x")]
        )
        right = cells(
            b,
            [
                ("tokens_per_forward", "{:.2f}"),
                ("tokens_per_s", "{:.1f}"),
                ("speedup_vs_own_greedy", "{:.2f}x"),
                ("speedup_vs_own_prompt_lookup", "{:.2f}x"),
            ],
        )
        agree = "-" if b is None else f"{b['agreement']:.3f} / {b['agreement_fp32']:.3f}"
        lines.append("| " + " | ".join([key[0], NAMES.get(key[1], key[1]), *left, *right, agree]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", default="docs/results/bench_generate_smollm2_fp32.json")
    parser.add_argument("--bf16", default="docs/results/bench_generate_smollm2_bf16.json")
    args = parser.parse_args(argv)
    print(table(rows_by_key(args.fp32), rows_by_key(args.bf16)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
