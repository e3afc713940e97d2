"""Answer quality of a pair's teacher and CLLM on more held-out questions than a speed benchmark can afford.

    python python/benchmarks/eval_quality.py --pair smollm2 --limit 100 --json docs/results/quality_smollm2.json

Speed rows of ``bench_generate.py`` run batch 1 on a few questions; accuracy over 8 questions cannot tell
a one-point difference. Here each model answers the first ``--limit`` held-out questions (the pair's
prompt format: the chat template for smollm2) with HF greedy decoding, batched (left padding,
``--batch`` rows at a time; Jacobi decoding is exactly greedy, so this is the quality of every exact
engine row), and the reference answers' perplexity is taken under each model (answer tokens only,
conditioned on the prompt). Columns: quality (the pair's metric, points, with a 95% Wilson interval),
perplexity, and the fraction of questions whose greedy answer is the same text under both models.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in points."""
    if total == 0:
        return (math.nan, math.nan)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (100 * max(0.0, centre - half), 100 * min(1.0, centre + half))


def greedy_answers(model, tokenizer, domain, prompts: list[str], max_new_tokens: int, batch: int) -> list[str]:
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = []
    try:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            enc = tokenizer(chunk, add_special_tokens=not domain.chat, return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(
                    **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
                )
            new = out[:, enc["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
            print(f"  {min(start + batch, len(prompts))}/{len(prompts)}", flush=True)
    finally:
        tokenizer.padding_side = side
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--pair", default="smollm2")
    parser.add_argument("--teacher", default=None, help="teacher (base) model: a folder or a named model")
    parser.add_argument("--cllm", default=None, help="CLLM: a folder or a named model")
    parser.add_argument("--limit", type=int, default=100, help="first N held-out questions")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.limit < 1 or args.batch < 1 or args.max_new_tokens < 1:
        parser.error("--limit, --batch and --max-new-tokens must be positive")

    import torch

    from jacobi_engine import models
    from jacobi_engine.domains import answer_perplexity, get_domain

    torch.set_num_threads(args.threads)
    domain = get_domain(args.pair)
    names = {"teacher": args.teacher or domain.model_path("teacher"), "cllm": args.cllm or domain.model_path("cllm")}
    records = domain.held_out()[: args.limit]
    answers = [r.get("answer") for r in records]
    started = time.perf_counter()
    rows, texts = [], {}
    for role, name in names.items():
        model, tokenizer = models.load(name, dtype=torch.float32, progress=False)
        model.eval()
        prompts = [domain.prompt(r, tokenizer) for r in records]
        print(f"{role}: {name}", flush=True)
        t0 = time.perf_counter()
        texts[role] = greedy_answers(model, tokenizer, domain, prompts, args.max_new_tokens, args.batch)
        correct = sum(domain.correct(t, a) for t, a in zip(texts[role], answers) if a is not None)
        scored = sum(a is not None for a in answers)
        ppl = answer_perplexity(model, tokenizer, prompts, answers, add_special_tokens=not domain.chat)
        low, high = wilson(correct, scored)
        rows.append(
            {
                "model": role,
                "name": name,
                "questions": scored,
                "correct": correct,
                "quality": 100.0 * correct / scored,
                "quality_95": [round(low, 2), round(high, 2)],
                "perplexity": ppl,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model
    same = sum(a == b for a, b in zip(texts["teacher"], texts["cllm"])) / len(records)
    teacher, cllm = rows
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "pair": args.pair,
        "quality_metric": domain.quality_name,
        "decoding": f"HF greedy, batches of {args.batch} (left padding), float32, {args.max_new_tokens} new tokens",
        "rows": rows,
        "same_answer_text": same,
        "quality_delta_points": cllm["quality"] - teacher["quality"],
        "perplexity_ratio": (cllm["perplexity"] / teacher["perplexity"]) if teacher["perplexity"] else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "samples": [
            {"question": r.get("question"), "teacher": t, "cllm": c}
            for r, t, c in list(zip(records, texts["teacher"], texts["cllm"]))[:5]
        ],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("| model | questions | quality (95% CI) | answer perplexity |")
    print("|---|---|---|---|")
    for row in rows:
        low, high = row["quality_95"]
        print(
            f"| {row['model']} | {row['questions']} | {row['quality']:.1f} ({low:.1f}-{high:.1f}) | {row['perplexity']:.3f} |"
        )
    print(f"CLLM - teacher: {result['quality_delta_points']:+.1f} points; perplexity x{result['perplexity_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
