"""Measure `jacobi-engine train` settings the way a new user runs it: fresh tiny model, CLI defaults.

    python python/examples/tune_defaults.py --out /tmp/tune --steps 300 \\
        --learning-rates 2e-5 1e-3 --schedules random progressive --json docs/results/tune_defaults.json

For each model seed: the toy setup (a random 2-layer Llama, BPE tokenizer on stdlib source, 8
prompts written 16 times), ``jacobi-engine collect`` (block 8, 32 new tokens, no EOS: docs/training.md's
toy command), then for every (learning rate, noise schedule, packing) one ``jacobi-engine train``
with every other option at its default apart from ``--max-steps``. Each CLLM is measured on the 8
prompts with random initial guesses the training never saw (engine seeds 1000-1002, chunked mode):
tokens per forward against the untrained model's, and the share of greedy tokens unchanged
(HF ``generate``). Prints a table and writes JSON with the command and machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

BLOCK, MAX_NEW, EVAL_SEEDS = 8, 32, (1000, 1001, 1002)


def tokens_per_forward(model, input_ids, attention_mask) -> float:
    from jacobi_engine import JacobiEngine

    values = []
    for seed in EVAL_SEEDS:
        engine = JacobiEngine(model, block_size=BLOCK, mode="chunked", seed=seed)
        output = engine.generate(input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW, eos_token_id=[])
        values.append(output.stats.tokens_per_forward)
    return sum(values) / len(values)


def greedy(model, input_ids, attention_mask) -> torch.Tensor:
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        output = model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0
        )
    return output[:, input_ids.shape[1] :]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--learning-rates", nargs="+", default=["default"], help="values, or 'default' (the CLI's: by model size)"
    )
    parser.add_argument("--schedules", nargs="+", default=["random", "progressive"])
    parser.add_argument("--packing", nargs="+", default=["packed"], choices=("packed", "unpacked"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[None], help="default: the CLI's")
    parser.add_argument("--lr-schedulers", nargs="+", default=[None], help="default: the CLI's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and steady on a shared machine

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jacobi_engine import cli
    from jacobi_engine.training import toy
    from jacobi_engine.training.collect import left_pad, read_prompts

    rows = []
    for seed in args.seeds:
        root = args.out / f"seed-{seed}"
        setup = toy.write_toy_setup(root, seed=seed)
        tokenizer = AutoTokenizer.from_pretrained(setup["model"])
        prompts = list(dict.fromkeys(record["prompt"] for record in read_prompts(setup["prompts"])))
        input_ids, attention_mask = left_pad([tokenizer(prompt)["input_ids"] for prompt in prompts])
        base = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
        before, greedy_before = (
            tokens_per_forward(base, input_ids, attention_mask),
            greedy(base, input_ids, attention_mask),
        )
        collect = ["collect", "--model", setup["model"], "--prompts", setup["prompts"], "--out", str(root / "data")]
        collect += ["--block-size", str(BLOCK), "--max-new-tokens", str(MAX_NEW), "--no-eos", "--batch-size", "16"]
        assert cli.main([*collect, "--no-progress"]) == 0
        grid = [
            (lr, schedule, packing, batch, scheduler)
            for lr in args.learning_rates
            for schedule in args.schedules
            for packing in args.packing
            for batch in args.batch_sizes
            for scheduler in args.lr_schedulers
        ]
        for learning_rate, schedule, packing, batch, scheduler in grid:
            name = f"lr{learning_rate}-{schedule}-{packing}-b{batch}-{scheduler}"
            train = ["train", "--model", setup["model"], "--data", str(root / "data")]
            train += ["--out", str(root / name), "--max-steps", str(args.steps)]
            train += ["--noise-schedule", schedule]
            train += ["--learning-rate", learning_rate] if learning_rate != "default" else []
            train += ["--packing" if packing == "packed" else "--no-packing"]
            train += ["--batch-size", str(batch)] if batch else []
            train += ["--lr-scheduler", scheduler] if scheduler else []
            train += ["--save-steps", str(args.steps), "--logging-steps", str(args.steps)]
            started = time.perf_counter()
            assert cli.main(train) == 0
            seconds = time.perf_counter() - started
            trained = AutoModelForCausalLM.from_pretrained(str(root / name)).eval()
            after = tokens_per_forward(trained, input_ids, attention_mask)
            agreement = (greedy(trained, input_ids, attention_mask) == greedy_before).float().mean().item()
            row = dict(
                seed=seed, learning_rate=learning_rate, schedule=schedule, packing=packing,
                batch_size=batch or "default", lr_scheduler=scheduler or "default",
                before=before, after=after, gain=after / before, greedy_unchanged=agreement,
                train_seconds=seconds,
            )  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| seed | lr | scheduler | batch | schedule | packing | tokens/forward before | after | gain | greedy same | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['seed']} | {row['learning_rate']} | {row['lr_scheduler']} | {row['batch_size']} | "
            f"{row['schedule']} | {row['packing']} | {row['before']:.2f} | "
            f"{row['after']:.2f} | {row['gain']:.2f}x | {row['greedy_unchanged']:.1%} | {row['train_seconds']:.0f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.processor() or platform.machine()}, 1 torch thread, torch {torch.__version__}",
            "steps": args.steps,
            "rows": rows,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
