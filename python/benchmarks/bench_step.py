"""Time one Jacobi step of a ~1B-parameter bf16 Llama-shaped model (random weights) on a GPU.

    python python/benchmarks/bench_step.py [--json OUT.json] [--block-size 16] [--prefix 512]

Compares the step time (model forward over the n-token block + verify/commit + guesses), eager and
captured in a CUDA graph, with the time it takes just to read the model's weights once at the
device-to-device copy bandwidth measured in the same run (the floor of a memory-bound step).
Target (issue 3): CUDA-graph step within 1.25x of that weight-read time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import copy_bandwidth, machine  # noqa: E402

from jacobi_engine import JacobiEngine  # noqa: E402


def llama_1b(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    # The shape of Llama 3.2 1B: 1.24B parameters with the tied 128k embedding.
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def step_time(engine: JacobiEngine, input_ids: torch.Tensor, steps: int) -> dict:
    """Seconds per decode step, from a run that decodes ``steps`` tokens-worth of steps.

    A prompt of random tokens keeps acceptance at about one token per step, so every run takes
    close to the same number of steps; we divide decode time by the forwards actually taken."""
    engine.generate(input_ids, max_new_tokens=8, eos_token_id=[])  # warm-up and compile
    torch.cuda.synchronize()
    out = engine.generate(input_ids, max_new_tokens=steps, eos_token_id=[])
    forwards = out.stats.forward_passes - 1
    return dict(
        seconds=out.stats.decode_seconds / forwards, forwards=forwards, tokens_per_forward=out.stats.tokens_per_forward
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    model = llama_1b(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # A copy moves each byte twice (read + write); reading the weights once moves them once.
    weight_read_seconds = weight_bytes / (bandwidth * 1e9 / 2)
    input_ids = torch.randint(0, model.config.vocab_size, (1, args.prefix), device=device)
    rows = []
    for cuda_graph in (False, True):
        engine = JacobiEngine(model, block_size=args.block_size, cuda_graph=cuda_graph)
        measured = step_time(engine, input_ids, args.steps)
        rows.append(
            dict(
                cuda_graph=cuda_graph,
                block_size=args.block_size,
                prefix=args.prefix,
                step_us=measured["seconds"] * 1e6,
                ratio_to_weight_read=measured["seconds"] / weight_read_seconds,
                forwards=measured["forwards"],
            )
        )
    # Plain HF greedy on the same model, per token, as the baseline users know.
    model.generate(input_ids, do_sample=False, max_new_tokens=4)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(input_ids, do_sample=False, max_new_tokens=args.steps, eos_token_id=None, pad_token_id=0)
    torch.cuda.synchronize()
    hf_token_seconds = (time.perf_counter() - start) / args.steps
    print(
        f"model: Llama-shaped, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, bf16, "
        f"{weight_bytes / 1e9:.2f} GB of weights"
    )
    print(f"copy bandwidth {bandwidth:.0f} GB/s -> weight read {weight_read_seconds * 1e6:.0f} µs")
    print(f"{'path':<22} {'step µs':>10} {'x weight read':>14}")
    for row in rows:
        name = "CUDA graph" if row["cuda_graph"] else "eager"
        print(f"{name:<22} {row['step_us']:>10.0f} {row['ratio_to_weight_read']:>14.2f}")
    print(
        f"{'HF greedy (per token)':<22} {hf_token_seconds * 1e6:>10.0f} {hf_token_seconds / weight_read_seconds:>14.2f}"
    )
    result = dict(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=machine(device),
        copy_bandwidth_gbps=bandwidth,
        weight_bytes=weight_bytes,
        weight_read_us=weight_read_seconds * 1e6,
        hf_greedy_token_us=hf_token_seconds * 1e6,
        rows=rows,
        target="CUDA-graph step <= 1.25x weight-read time",
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
