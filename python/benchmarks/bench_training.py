"""Consistency-training throughput: packed rows against one row per sample, on the same data, in one run.

    python python/benchmarks/bench_training.py --json docs/results/bench_training.json

Data: the shipped GSM8K teacher's trajectories (n=16, up to 256 new tokens) on ``--prompts`` train
questions (the first of train_cllm.py's seeded shuffle), collected once into ``--data`` (resumable).
Training: ``train_consistency`` exactly as ``jacobi-engine train`` runs it with the shipped CLLM's
recipe (global loss, AR term on ``--ar-data`` = the whole GSM8K train split, weight 5, lr 1e-3),
no checkpoints, once unpacked (``--batch-size`` samples per step) and once packed
(``--packed-batch-size`` prompts per step, i.e. all their chunks), alternating ``--repeats`` times
so that machine load hits both alike. A sample is one (prompt, chunk, state) triple either way.
samples/s counts every step (``--warmup`` 0), timed from the trainer's step callbacks; the packed
run's default 6 steps of 16 prompts cover each of the 96 prompts exactly once.

Also timed: the packed forward without gradients (the local loss's teacher) with the SDPA boolean
mask and with FlexAttention (compiled), and whether FlexAttention can train here (its CPU backend
has no backward). Writes a table to stdout and JSON with the command, the machine and every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "jacobi_engine" / "assets" / "cllm-gsm8k" / "teacher"


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        pass
    return info


class StepTimer(transformers.TrainerCallback):
    """Wall time and samples of every optimizer step."""

    def __init__(self):
        self.steps: list[tuple[float, int]] = []
        self.trainer = None
        self._start = None
        self._samples = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._samples = self.samples_so_far()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((time.perf_counter() - self._start, self.samples_so_far() - self._samples))

    def samples_so_far(self) -> int:
        return getattr(self.trainer, "samples_seen", 0) if self.trainer is not None else 0


def collect(args, data_dir: Path) -> tuple[int, int]:
    from jacobi_engine.gsm8k import format_prompt, load_jsonl_gz, repo_data_path
    from jacobi_engine.training.collect import collect_trajectories

    records = load_jsonl_gz(repo_data_path("train"))
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    prompts = [{"prompt": format_prompt(records[i]["question"]), "answer": records[i]["answer"]} for i in order]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.teacher))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(args.teacher), dtype=torch.float32).eval()
    dataset = collect_trajectories(
        model, tokenizer, prompts[: args.prompts], data_dir, block_size=16, max_new_tokens=256, batch_size=32,
        progress=False,
    )  # fmt: skip
    ar_data = data_dir / "ar_data.jsonl"
    if not ar_data.exists():
        with open(ar_data, "w") as handle:
            for record in records:
                handle.write(json.dumps({"prompt": format_prompt(record["question"]), "answer": record["answer"]}))
                handle.write("\n")
    return len(dataset), len(set(dataset["prompt_index"]))


def train_run(args, data_dir: Path, packing: bool, out: Path) -> dict:
    from jacobi_engine.training.recipe import train_consistency

    timer = StepTimer()

    steps = args.packed_steps if packing else args.unpacked_steps
    batch = args.packed_batch_size if packing else args.batch_size

    # The timer needs the trainer (packed steps count their samples there); train_consistency
    # builds it, so hook its constructor for this call.
    from jacobi_engine.training import packing as packing_module

    original_init = packing_module.PackedConsistencyTrainer.__init__

    def init_and_attach(self, *a, **k):
        original_init(self, *a, **k)
        timer.trainer = self

    packing_module.PackedConsistencyTrainer.__init__ = init_and_attach
    try:
        train_consistency(
            args.teacher, data_dir, out, loss="global", ar_weight=5.0, ar_data=data_dir / "ar_data.jsonl",
            max_steps=steps, learning_rate=1e-3, batch_size=batch, lr_scheduler="constant", save_steps=10**6,
            logging_steps=10**6, seed=0, packing=packing, attention="sdpa", callbacks=[timer],
        )  # fmt: skip
    finally:
        packing_module.PackedConsistencyTrainer.__init__ = original_init
    timed = timer.steps[args.warmup :]
    seconds = sum(s for s, _ in timed)
    samples = sum(n for _, n in timed) if packing else batch * len(timed)
    return {
        "mode": "packed" if packing else "unpacked",
        "batch": f"{batch} prompts" if packing else f"{batch} samples",
        "steps_timed": len(timed),
        "seconds": seconds,
        "samples": samples,
        "samples_per_s": samples / seconds,
        "seconds_per_step": statistics.median(s for s, _ in timed),
    }


def forward_rows(args, data_dir: Path) -> tuple[list[dict], str]:
    """Packed forward without gradients: SDPA boolean mask vs FlexAttention BlockMask."""
    from datasets import load_from_disk

    from jacobi_engine.training.packed_attention import packed_logits
    from jacobi_engine.training.packing import PackedCollator, group_by_prompt

    model = transformers.AutoModelForCausalLM.from_pretrained(str(args.teacher), dtype=torch.float32).eval()
    records = group_by_prompt(load_from_disk(str(data_dir)))
    collator = PackedCollator(loss="global", seed=0, pad_to_multiple=128)
    batches = [
        collator(records[i : i + args.packed_batch_size]) for i in range(0, len(records), args.packed_batch_size)
    ]
    batches = batches[: args.forward_batches]
    rows = []
    for attention in ("sdpa", "flex"):
        times = []
        with torch.no_grad():
            for repeat in range(2):  # the first pass compiles FlexAttention for each shape
                for batch in batches:
                    start = time.perf_counter()
                    packed_logits(model, batch["input_ids"], batch, attention)
                    if repeat == 1:
                        times.append(time.perf_counter() - start)
        samples = sum(int(batch["student_index"].shape[0]) for batch in batches)
        rows.append({"attention": attention, "forward_seconds": sum(times), "samples_per_s": samples / sum(times)})
    # Training with FlexAttention here: record what torch says.
    batch = batches[0]
    model.train()
    try:
        logits = packed_logits(model, batch["input_ids"], batch, "flex")
        logits.sum().backward()
        flex_training = "works"
    except Exception as error:  # noqa: BLE001 - the message is the measurement
        flex_training = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return rows, flex_training


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "jacobi-bench-training-data")
    parser.add_argument("--prompts", type=int, default=96, help="GSM8K train questions to collect on")
    parser.add_argument("--batch-size", type=int, default=16, help="unpacked: samples per step (shipped recipe)")
    parser.add_argument("--packed-batch-size", type=int, default=16, help="packed: prompts per step")
    parser.add_argument("--unpacked-steps", type=int, default=14)
    parser.add_argument("--packed-steps", type=int, default=6, help="6 x 16 prompts: each of the 96 prompts once")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="first steps of each run left out of the timing (0: the packed sampler puts its longest batch first, "
        "so skipping steps would favour packing)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternating unpacked/packed runs")
    parser.add_argument("--forward-batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    started, load_at_start = time.perf_counter(), os.getloadavg()
    samples, prompts = collect(args, args.data)
    print(f"data: {samples} chunk trajectories of {prompts} prompts in {args.data}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for packing in (False, True):
                row = train_run(args, args.data, packing, Path(scratch) / f"{repeat}-{packing}")
                row["repeat"] = repeat
                runs.append(row)
                print(json.dumps(row), flush=True)
    forward, flex_training = forward_rows(args, args.data)

    summary = {}
    for mode in ("unpacked", "packed"):
        mine = [row for row in runs if row["mode"] == mode]
        summary[mode] = sum(row["samples"] for row in mine) / sum(row["seconds"] for row in mine)
    ratio = summary["packed"] / summary["unpacked"]
    print()
    print("| mode | batch | steps timed | samples | seconds | samples/s |")
    print("|---|---|---|---|---|---|")
    for row in runs:
        print(
            f"| {row['mode']} (run {row['repeat'] + 1}) | {row['batch']} | {row['steps_timed']} | {row['samples']} | "
            f"{row['seconds']:.1f} | {row['samples_per_s']:.2f} |"
        )
    print(f"\npacked / unpacked: {summary['packed']:.2f} / {summary['unpacked']:.2f} samples/s = {ratio:.2f}x")
    print("\n| packed forward, no grad | samples/s |\n|---|---|")
    for row in forward:
        print(f"| {row['attention']} | {row['samples_per_s']:.1f} |")
    print(f"FlexAttention training on this machine: {flex_training}")
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "data": {"chunk_trajectories": samples, "prompts": prompts, "block_size": 16, "max_new_tokens": 256},
        "recipe": "global loss, ar_data = GSM8K train split, ar_weight 5, lr 1e-3 constant, SDPA mask",
        "runs": runs,
        "samples_per_s": summary,
        "packed_over_unpacked": ratio,
        "packed_forward_no_grad": forward,
        "flex_attention_training": flex_training,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
