"""Cost of a tensor-parallel Jacobi step against one process (random Llama-shaped model).

    python python/benchmarks/bench_tp.py --json one.json [--threads 2]                  # one process
    torchrun --standalone --nproc_per_node 2 python/benchmarks/bench_tp.py --json tp.json  # TP, gloo on CPU

Decodes one prompt with ``JacobiEngine`` (greedy, no EOS) on a random Llama saved once to
``--model-dir`` and loaded with ``from_pretrained`` (``tp_plan="auto"`` when launched as several
processes), and reports the mean decode step (one forward over the block + verify + guesses), for
AR (n=1) and Jacobi (n=16). Rank 0 writes the JSON; every rank's generated tokens must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def build_model(model_dir: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    # ~150M parameters: 8 layers of width 1024, GQA 16/8 heads, a 32k vocabulary.
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--model-dir", default="/tmp/jacobi-bench-tp-model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from jacobi_engine import JacobiEngine

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not os.path.exists(os.path.join(args.model_dir, "config.json")):
        build_model(args.model_dir)
    if world_size > 1:
        dist.init_process_group("gloo")
        dist.barrier()  # rank 0 has saved the model
    dtype = getattr(torch, args.dtype)
    extra = {"tp_plan": "auto"} if world_size > 1 else {}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, **extra).eval()
    input_ids = torch.randint(3, 32000, (1, args.prompt_length), generator=torch.Generator().manual_seed(1))

    rows = []
    for block_size in (1, 16):
        engine = JacobiEngine(model, block_size=block_size, mode="sliding", init="ngram")
        engine.generate(input_ids, max_new_tokens=4, eos_token_id=[])  # warm-up (allocations, caches)
        start = time.perf_counter()
        out = engine.generate(input_ids, max_new_tokens=args.max_new_tokens, eos_token_id=[])
        seconds = time.perf_counter() - start
        steps = out.stats.forward_passes - 1  # decode forwards (the prefill excluded)
        tokens = out.sequences[0, args.prompt_length :].tolist()
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, tokens)
            assert all(other == tokens for other in gathered), "ranks generated different tokens"
        rows.append(
            {
                "block_size": block_size,
                "decode_steps": steps,
                "step_ms": 1000 * out.stats.decode_seconds / steps,
                "tokens_per_forward": out.stats.tokens_per_forward,
                "tokens_per_second": args.max_new_tokens / seconds,
            }
        )
    if rank == 0:
        result = {
            "command": " ".join(["torchrun --nproc_per_node", str(world_size)] if world_size > 1 else ["python"])
            + " python/benchmarks/bench_tp.py "
            + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items()),
            "processes": world_size,
            "threads_per_process": args.threads,
            "dtype": args.dtype,
            "parameters": sum(p.numel() for p in model.parameters()),  # a DTensor counts its global size
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "torch": torch.__version__,
            "rows": rows,
        }
        print(f"{'n':>3} {'steps':>6} {'step ms':>9} {'tok/fwd':>8} {'tok/s':>7}   ({world_size} process(es))")
        for row in rows:
            print(
                f"{row['block_size']:>3} {row['decode_steps']:>6} {row['step_ms']:>9.1f} "
                f"{row['tokens_per_forward']:>8.2f} {row['tokens_per_second']:>7.1f}"
            )
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
