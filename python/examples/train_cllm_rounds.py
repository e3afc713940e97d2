"""Reference pair v2, CLLM stage: R on-policy rounds of collect-then-train from a teacher.

    python python/examples/train_cllm_rounds.py --teacher runs/v2/gsm8k/teacher --out runs/v2/gsm8k/cllm
    python python/examples/train_cllm_rounds.py --domain code --teacher runs/v2/code/teacher --out runs/v2/code/cllm

Round r collects the trajectories of the current model (the teacher, then round r-1's CLLM) on
``--prompts-per-round`` fresh train prompts (slice r of a seeded shuffle of the train split) and
trains it with packed consistency training (``train_consistency``: global loss, AR term on the
WHOLE train split via ``ar_data``, ``--max-steps`` steps of ``--batch-size`` prompts with all
their chunks), see :mod:`jacobi_engine.training.rounds`. Then a check on ``--dev`` other train
prompts (the last of the shuffle): plain-Jacobi tokens per forward of the teacher and of every
round's CLLM, and the share of greedy tokens unchanged. The held-out splits are left for
python/benchmarks/bench_generate.py.

Resumable: rerun the same command after a kill; finished rounds are skipped, a collection resumes
per batch and a training from its last checkpoint. Writes OUT/round-*/ (data, cllm, done.json),
OUT/cllm (the final CLLM, with ``jacobi_block_size`` in its config) and OUT/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def domain_records(domain: str) -> list[dict]:
    """Train records with "prompt" and "answer" texts, in file order."""
    from jacobi_engine.gsm8k import format_prompt, load_jsonl_gz, repo_data_path

    if domain == "gsm8k":
        return [
            {"prompt": format_prompt(r["question"]), "answer": r["answer"]}
            for r in load_jsonl_gz(repo_data_path("train"))
        ]
    if domain == "code":
        return [
            {"prompt": r["prompt"], "answer": r["answer"]}
            for r in load_jsonl_gz(REPO / "data" / "code" / "train.jsonl.gz")
        ]
    raise ValueError(f"--domain must be gsm8k or code, got {domain!r}")


def dev_check(model_dirs: dict[str, Path], prompts: list[str], block_size: int, max_new_tokens: int, seed: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jacobi_engine import JacobiEngine

    tokenizer = AutoTokenizer.from_pretrained(str(next(iter(model_dirs.values()))))
    check, outputs = {}, {}
    for name, directory in model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        engine = JacobiEngine(model, block_size=block_size, seed=seed + 1000)  # guesses unseen in training
        tokens = forwards = 0
        outputs[name] = []
        for prompt in prompts:
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            result = engine.generate(input_ids, max_new_tokens=max_new_tokens)
            tokens += result.stats.tokens_generated
            forwards += result.stats.forward_passes
            outputs[name].append(result.sequences[0, input_ids.shape[1] :].tolist())
        check[f"{name}_tokens_per_forward"] = tokens / forwards
    reference = outputs["teacher"]
    for name in model_dirs:
        same = sum(a == b for x, y in zip(reference, outputs[name]) for a, b in zip(x, y))
        check[f"{name}_greedy_tokens_unchanged"] = same / max(1, sum(len(x) for x in reference))
    return check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--domain", choices=("gsm8k", "code"), default="gsm8k")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts-per-round", type=int, default=600)
    parser.add_argument("--dev", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--collect-batch", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=300, help="training steps per round")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step (all their chunks)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--ar-weight", type=float, default=5.0)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--noise-schedule", choices=("random", "progressive"), default="random")
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from jacobi_engine.training.rounds import round_dir, run_rounds

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    records = domain_records(args.domain)
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    if args.rounds * args.prompts_per_round + args.dev > len(records):
        raise ValueError(
            f"{args.rounds} rounds x {args.prompts_per_round} prompts + {args.dev} dev > {len(records)} train records"
        )
    ar_data = args.out / "ar_data.jsonl"
    if not ar_data.exists():
        with open(ar_data.with_suffix(".tmp"), "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        ar_data.with_suffix(".tmp").replace(ar_data)

    def prompts_for_round(r: int) -> list[dict]:
        return [records[i] for i in order[r * args.prompts_per_round : (r + 1) * args.prompts_per_round]]

    started = time.perf_counter()
    final = run_rounds(
        args.teacher, args.out, args.rounds, prompts_for_round, block_size=args.block_size,
        max_new_tokens=args.max_new_tokens, collect_batch_size=args.collect_batch, seed=args.seed,
        train_options=dict(
            loss="global", ar_weight=args.ar_weight, ar_data=ar_data, max_steps=args.max_steps,
            learning_rate=args.learning_rate, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
            noise_schedule=args.noise_schedule, save_steps=args.save_steps, logging_steps=10, packing=True,
        ),
        log=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    shutil.copytree(final, args.out / "cllm", dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint-*"))
    config_path = args.out / "cllm" / "config.json"
    config = json.loads(config_path.read_text())
    config["jacobi_block_size"] = args.block_size  # tools default to the block size it was trained for
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    dev_prompts = [records[i]["prompt"] for i in order[-args.dev :]]
    models = {"teacher": args.teacher} | {f"round{r}": round_dir(args.out, r) / "cllm" for r in range(args.rounds)}
    check = dev_check(models, dev_prompts, args.block_size, args.max_new_tokens, args.seed)
    metrics = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "rounds": [json.loads((round_dir(args.out, r) / "done.json").read_text()) for r in range(args.rounds)],
        "seconds_this_run": seconds,
        "dev_check": check,
        "machine": f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}",
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
