"""Turn the GSM8K teacher into a CLLM: collect its Jacobi trajectories, then consistency-train it.

    python python/examples/train_cllm.py --teacher runs/teacher --out runs/cllm

Steps (everything seeded):
1. prompts: ``--prompts`` questions drawn at random (seed) from the TRAIN split, in the teacher's
   prompt format, with the reference answers as ground-truth labels;
2. ``collect_trajectories``: the teacher decodes them with the engine in chunked mode (block
   ``--block-size``, random-prompt initial guesses, batched, KV-cached) and every state of every
   chunk is saved (the collector of ``jacobi-engine collect``);
3. ``train_consistency``: global consistency loss + AR loss (``--ar-weight``, 5) on ground-truth answers
   drawn from the WHOLE train split (the trainer of ``jacobi-engine train`` with ``ar_data``: with a few hundred
   collected prompts, an AR term on their own answers memorises them and the held-out perplexity
   rises), ``--max-steps`` steps of ``--batch-size`` samples;
4. a quick check on ``--dev`` other TRAIN questions: tokens per forward of teacher and CLLM
   (Jacobi, sliding mode) and whether the greedy output changed. The held-out split is left
   for python/benchmarks/bench_generate.py.

Writes OUT/cllm (the model, loadable with from_pretrained), OUT/data (the trajectories) and
OUT/metrics.json (timings per phase, settings, the check). The defaults are the shipped CLLM's
settings: about 38 minutes on 2 CPU cores with two torch threads (collection about 3 minutes, 700
training steps about 35). Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher model directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=600, help="train questions to collect trajectories on")
    parser.add_argument("--dev", type=int, default=30, help="other train questions for the final check")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--collect-batch", type=int, default=32)
    parser.add_argument("--loss", choices=("global", "local"), default="global")
    parser.add_argument("--ar-weight", type=float, default=5.0)
    parser.add_argument("--max-steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--augment", action="store_true", help="CLLM's data augmentation of the states")
    parser.add_argument(
        "--packing",
        action="store_true",
        help="packed training (off: the shipped v1 CLLM was trained one sample per row, --batch-size samples)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jacobi_engine import JacobiEngine
    from jacobi_engine.gsm8k import format_prompt, load_jsonl_gz, repo_data_path
    from jacobi_engine.training.collect import collect_trajectories
    from jacobi_engine.training.recipe import train_consistency

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()

    records = load_jsonl_gz(repo_data_path("train"))
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    chosen = [records[i] for i in order[: args.prompts]]
    dev = [records[i] for i in order[args.prompts : args.prompts + args.dev]]
    prompts = [{"prompt": format_prompt(r["question"]), "answer": r["answer"]} for r in chosen]
    ar_data = out / "ar_data.jsonl"
    with open(ar_data, "w") as handle:
        for record in records:
            handle.write(json.dumps({"prompt": format_prompt(record["question"]), "answer": record["answer"]}) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(args.teacher, local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True, dtype=torch.float32).eval()
    phase = time.perf_counter()
    dataset = collect_trajectories(
        teacher,
        tokenizer,
        prompts,
        out / "data",
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.collect_batch,
        augment=args.augment,
        seed=args.seed,
    )
    timings["collect_seconds"] = time.perf_counter() - phase
    print(f"collected {len(dataset)} chunk trajectories in {timings['collect_seconds']:.0f} s", flush=True)

    phase = time.perf_counter()
    train_consistency(
        args.teacher,
        out / "data",
        out / "cllm",
        loss=args.loss,
        ar_weight=args.ar_weight,
        ar_data=ar_data,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        lr_scheduler=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        save_steps=max(50, args.max_steps // 4),
        logging_steps=10,
        seed=args.seed,
        resume=True,  # a rerun continues (or, with no checkpoint yet, starts) the run in OUT/cllm
        packing=args.packing,
    )
    timings["train_seconds"] = time.perf_counter() - phase
    # Record the block size the CLLM was trained for, so tools can default to it.
    config_path = out / "cllm" / "config.json"
    config = json.loads(config_path.read_text())
    config["jacobi_block_size"] = args.block_size
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    phase = time.perf_counter()
    cllm = AutoModelForCausalLM.from_pretrained(out / "cllm", local_files_only=True, dtype=torch.float32).eval()
    check = {}
    outputs = {}
    for name, model in (("teacher", teacher), ("cllm", cllm)):
        engine = JacobiEngine(model, block_size=args.block_size, seed=args.seed + 1000)
        tokens = forwards = 0
        outputs[name] = []
        for record in dev:
            input_ids = tokenizer(format_prompt(record["question"]), return_tensors="pt").input_ids
            result = engine.generate(input_ids, max_new_tokens=args.max_new_tokens)
            tokens += result.stats.tokens_generated
            forwards += result.stats.forward_passes
            outputs[name].append(result.sequences[0, input_ids.shape[1] :].tolist())
        check[f"{name}_tokens_per_forward"] = tokens / forwards
    same = sum(a == b for x, y in zip(outputs["teacher"], outputs["cllm"]) for a, b in zip(x, y))
    check["greedy_tokens_unchanged"] = same / max(1, sum(len(x) for x in outputs["teacher"]))
    timings["check_seconds"] = time.perf_counter() - phase
    timings["collect_and_train_seconds"] = timings["collect_seconds"] + timings["train_seconds"]
    timings["total_seconds"] = time.perf_counter() - started
    metrics = dict(
        command="python " + " ".join(sys.argv),
        args=vars(args),
        chunk_trajectories=len(dataset),
        timings=timings,
        dev_check=check,
        machine=f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}",
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
