"""Microbenchmarks of the fused ops against the eager PyTorch sequences they replace.

    python python/benchmarks/bench_kernels.py [--device cpu|cuda] [--json OUT.json] [--quick]

verify_and_commit
    fused (native op: C++ on CPU, one CUDA launch on GPU, argmax fused in when given logits)
    vs the eager sequence argmax + compare + cumprod + index updates (jacobi_engine.reference).
    Also the native op fed a precomputed argmax, to measure what fusing the argmax buys.
block attention with in-place append
    fused (Triton on CUDA; the torch reference on CPU, where Triton only runs interpreted)
    vs index_copy_ of the block's K/V into the cache + SDPA with an explicit mask.

Reports median µs, achieved GB/s (bytes the op must touch: logits or K/V read, outputs written)
and, on CUDA, that bandwidth as a fraction of a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from jacobi_engine import build_info, ops, reference


# ----------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "jacobi_engine": build_info(),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["triton"] = __import__("triton").__version__
    return info


def timed(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth in GB/s (read + write), the roofline for memory-bound ops."""
    if device.type != "cuda":
        return None
    source = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device, repeats=20)
    return 2 * source.numel() / seconds / 1e9


# ----------------------------------------------------------------------------------------------
def verify_inputs(batch: int, n: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(batch, n, vocab, generator=generator).to(device=device, dtype=dtype)
    preds = logits.argmax(-1)
    block = preds.roll(1, dims=1)
    block[:, n // 2 :] = torch.randint(0, vocab, (batch, n - n // 2), generator=generator).to(device)
    max_new_tokens = 1 << 20
    state = dict(
        block=block,
        fill=torch.randint(0, vocab, (batch, n), generator=generator).to(device),
        cache_seqlens=torch.zeros(batch, dtype=torch.int32, device=device),
        out_tokens=torch.zeros(batch, 4096 + n, dtype=torch.long, device=device),
        n_generated=torch.zeros(batch, dtype=torch.int32, device=device),
        done=torch.zeros(batch, dtype=torch.bool, device=device),
        eos_ids=torch.tensor([2], device=device),
    )
    return logits, preds, state, max_new_tokens


def bench_verify(device: torch.device, sizes, repeats: int) -> list[dict]:
    rows = []
    for batch, n, vocab, dtype in sizes:
        logits, preds, state, _ = verify_inputs(batch, n, vocab, dtype, device)

        def call(scores, backend, state=state):
            # Reset what a step advances so every timed call does the same work.
            state["n_generated"].zero_()
            state["done"].zero_()
            target = ops.CommitTarget(
                state["out_tokens"],
                state["n_generated"],
                state["done"],
                state["eos_ids"],
                4096,
                state["cache_seqlens"],
                False,
            )
            ops.verify_and_commit(scores, state["block"], state["fill"], target, backend=backend)

        logit_bytes = logits.numel() * logits.element_size()
        small_bytes = batch * n * 8 * 4  # block, fill, preds, emitted tokens
        variants = [
            ("fused (native, logits)", lambda: call(logits, "native"), logit_bytes + small_bytes),
            (
                "native on argmax (argmax by torch)",
                lambda: call(logits.argmax(-1), "native"),
                logit_bytes + small_bytes,
            ),
            ("eager torch sequence (baseline)", lambda: call(logits, "torch"), logit_bytes + small_bytes),
        ]
        for name, fn, bytes_touched in variants:
            seconds = timed(fn, device, repeats)
            rows.append(
                dict(
                    op="verify_and_commit",
                    variant=name,
                    device=device.type,
                    batch=batch,
                    n=n,
                    vocab=vocab,
                    dtype=str(dtype).replace("torch.", ""),
                    us=seconds * 1e6,
                    gbps=bytes_touched / seconds / 1e9,
                )
            )
    return rows


# ----------------------------------------------------------------------------------------------
def sdpa_baseline(q, k_cache, v_cache, k_new, v_new, cache_seqlens, scale):
    """What the fused op replaces: index_copy_ the block into the cache, then SDPA with a mask."""
    batch, n, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    rows = cache_seqlens.long()[:, None] + torch.arange(n, device=q.device)
    flat_rows = (torch.arange(batch, device=q.device)[:, None] * k_cache.shape[1] + rows).reshape(-1)
    k_cache.view(-1, n_kv_heads, head_dim).index_copy_(0, flat_rows, k_new.reshape(-1, n_kv_heads, head_dim))
    v_cache.view(-1, n_kv_heads, head_dim).index_copy_(0, flat_rows, v_new.reshape(-1, n_kv_heads, head_dim))
    key_pos = torch.arange(k_cache.shape[1], device=q.device)
    mask = key_pos[None, None, None, :] <= rows[:, None, :, None]
    return F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k_cache.transpose(1, 2),
        v_cache.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=n_heads != n_kv_heads,
    ).transpose(1, 2)


def bench_attention(device: torch.device, sizes, repeats: int) -> list[dict]:
    rows = []
    fused_backend = "triton" if device.type == "cuda" else "torch"
    for batch, n, n_heads, n_kv_heads, head_dim, prefix, dtype in sizes:
        generator = torch.Generator(device="cpu").manual_seed(0)
        capacity = prefix + n

        def rand(*shape):
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

        q = rand(batch, n, n_heads, head_dim)
        k_cache, v_cache = rand(batch, capacity, n_kv_heads, head_dim), rand(batch, capacity, n_kv_heads, head_dim)
        k_new, v_new = rand(batch, n, n_kv_heads, head_dim), rand(batch, n, n_kv_heads, head_dim)
        seqlens = torch.full((batch,), prefix, dtype=torch.int32, device=device)
        scale = 1.0 / math.sqrt(head_dim)
        element = q.element_size()
        # Bytes the op must touch: the prefix K/V read, the block's K/V read and written, q read, out written.
        bytes_touched = element * (
            2 * batch * prefix * n_kv_heads * head_dim + 4 * batch * n * n_kv_heads * head_dim + 2 * q.numel()
        )
        variants = [
            (
                f"fused ({fused_backend})",
                lambda: ops.jacobi_attention(q, k_cache, v_cache, k_new, v_new, seqlens, scale, backend=fused_backend),
            ),
            (
                "index_copy_ + SDPA with mask (baseline)",
                lambda: sdpa_baseline(q, k_cache, v_cache, k_new, v_new, seqlens, scale),
            ),
        ]
        if device.type == "cuda":
            variants.append(
                (
                    "torch reference",
                    lambda: reference.jacobi_attention(q, k_cache, v_cache, k_new, v_new, seqlens, scale),
                )
            )
        for name, fn in variants:
            seconds = timed(fn, device, repeats)
            rows.append(
                dict(
                    op="jacobi_attention",
                    variant=name,
                    device=device.type,
                    batch=batch,
                    n=n,
                    heads=n_heads,
                    kv_heads=n_kv_heads,
                    head_dim=head_dim,
                    prefix=prefix,
                    dtype=str(dtype).replace("torch.", ""),
                    us=seconds * 1e6,
                    gbps=bytes_touched / seconds / 1e9,
                )
            )
    return rows


# ----------------------------------------------------------------------------------------------
def sweep(device: torch.device, quick: bool):
    if device.type == "cuda":
        verify = [
            (b, n, v, dt)
            for b in (1, 8, 32)
            for n in (16, 64)
            for v in (32000, 128256)
            for dt in (torch.bfloat16, torch.float32)
        ]
        attention = [
            (b, n, 32, 8, d, p, torch.bfloat16)
            for b in (1, 8)
            for n in (1, 16, 64)
            for d in (64, 128)
            for p in (1024, 4096, 16384)
        ]
        repeats = 50
    else:
        verify = [(b, n, v, torch.float32) for b in (1, 8) for n in (4, 16) for v in (32000,)]
        attention = [(b, n, 8, 2, 64, p, torch.float32) for b in (1, 4) for n in (1, 16) for p in (512, 2048)]
        repeats = 20
    if quick:
        verify, attention, repeats = verify[:2], attention[:2], 5
    return verify, attention, repeats


def print_table(rows: list[dict], bandwidth: float | None) -> None:
    header = f"{'op':<18} {'variant':<40} {'shape':<46} {'µs':>10} {'GB/s':>9}"
    if bandwidth:
        header += f" {'% copy BW':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["op"] == "verify_and_commit":
            shape = f"B={row['batch']} n={row['n']} V={row['vocab']} {row['dtype']}"
        else:
            shape = (
                f"B={row['batch']} n={row['n']} H={row['heads']}/{row['kv_heads']} D={row['head_dim']} "
                f"L={row['prefix']} {row['dtype']}"
            )
        line = f"{row['op']:<18} {row['variant']:<40} {shape:<46} {row['us']:>10.1f} {row['gbps']:>9.1f}"
        if bandwidth:
            line += f" {100 * row['gbps'] / bandwidth:>9.1f}%"
        print(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="two sizes per op, for smoke tests")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    verify_sizes, attention_sizes, repeats = sweep(device, args.quick)
    bandwidth = copy_bandwidth(device)
    rows = bench_verify(device, verify_sizes, repeats) + bench_attention(device, attention_sizes, repeats)
    for row in rows:
        if bandwidth:
            row["fraction_of_copy_bandwidth"] = row["gbps"] / bandwidth
    print_table(rows, bandwidth)
    if bandwidth:
        print(f"\ndevice-to-device copy bandwidth measured in this run: {bandwidth:.0f} GB/s")
    result = dict(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=machine(device),
        copy_bandwidth_gbps=bandwidth,
        baselines={
            "verify_and_commit": "eager torch sequence (jacobi_engine.reference.verify_and_commit)",
            "jacobi_attention": "index_copy_ + F.scaled_dot_product_attention with an explicit mask",
        },
        rows=rows,
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
