"""Progressive against random noise on the GSM8K v2 pair, same data, same steps.

    python python/examples/compare_noise_schedules.py --teacher runs/v2/gsm8k/teacher \
        --round runs/v2/gsm8k/cllm/round-0 --out runs/v2/gsm8k/schedules --json docs/results/noise_schedules_gsm8k.json

Takes round 0 of ``train_cllm_rounds.py`` (trajectories the teacher collected, and the CLLM trained
on them with ``--noise-schedule random``), trains a second CLLM from the teacher on the very same
trajectories with every option equal except ``noise_schedule="progressive"`` (and the same seed);
``--schedule``, ``--learning-rate``, ``--max-steps`` and ``--name`` train other variants the same way,
then measures both, and the teacher, on held-out GSM8K questions: plain-Jacobi tokens per forward
(n=16, random-prompt initial guesses, engine seed 1234, which no training run used) and the held-out
answer perplexity. Resumable: training checkpoints every 50 steps; rerun the same command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def measure(path: Path, records: list[dict], domain, block_size: int, max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jacobi_engine import JacobiEngine
    from jacobi_engine.domains import answer_perplexity

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    engine = JacobiEngine(model, block_size=block_size, seed=1234)
    tokens = forwards = 0
    for record in records:
        input_ids = tokenizer(domain.prompt(record), return_tensors="pt").input_ids
        out = engine.generate(input_ids, max_new_tokens=max_new_tokens)
        tokens += out.stats.tokens_generated
        forwards += out.stats.forward_passes
    prompts = [domain.prompt(record) for record in records]
    perplexity = answer_perplexity(model, tokenizer, prompts, [record["answer"] for record in records])
    return {"tokens_per_forward": tokens / forwards, "tokens": tokens, "forwards": forwards, "perplexity": perplexity}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--round", type=Path, required=True, help="round-0 directory of train_cllm_rounds.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--ar-data", type=Path, default=None, help="default: ROUND/../ar_data.jsonl")
    parser.add_argument("--limit", type=int, default=30, help="held-out questions measured")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--schedule", choices=("random", "progressive"), default="progressive")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--name", default="progressive", help="the variant's directory under --out, and its key")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from jacobi_engine.domains import get_domain
    from jacobi_engine.training.recipe import train_consistency

    torch.set_num_threads(args.threads)
    done = json.loads((args.round / "done.json").read_text())
    ar_data = args.ar_data or args.round.parent / "ar_data.jsonl"
    # The options of train_cllm_rounds.py's round 0 (seed + round index = 0), schedule aside.
    options = dict(
        loss="global", ar_weight=5.0, ar_data=ar_data, max_steps=args.max_steps, learning_rate=args.learning_rate,
        batch_size=8,
        warmup_steps=20, save_steps=50, logging_steps=10, packing=True, seed=0,
    )  # fmt: skip
    started = time.perf_counter()
    variant = args.out / args.name
    if not (variant / "model.safetensors").exists():
        train_consistency(
            args.teacher, args.round / "data", variant, resume=True, noise_schedule=args.schedule, **options
        )
    train_seconds = time.perf_counter() - started
    domain = get_domain("gsm8k")
    records = domain.held_out()[: args.limit]
    models = {"teacher": args.teacher, "random": args.round / "cllm", args.name: variant}
    results = {name: measure(path, records, domain, 16, 256) for name, path in models.items()}
    for name in ("random", args.name):
        results[name]["gain_over_teacher"] = (
            results[name]["tokens_per_forward"] / results["teacher"]["tokens_per_forward"]
        )
    summary = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "round0": done,
        "options": {key: str(value) for key, value in options.items()},
        "variant": {"name": args.name, "noise_schedule": args.schedule},
        "variant_train_seconds_this_run": train_seconds,
        "held_out_questions": len(records),
        "results": results,
        "winner": max(("random", args.name), key=lambda name: results[name]["tokens_per_forward"]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
