"""Realistic-size checks of the CUDA and Triton ops, for python/benchmarks/gpu_check.sh.

The test suite runs the kernels at small sizes; these run them where real models run them and
compare with an independent statement of the result, on the GPU:

* ``verify``: verify_and_commit at B=64, n=32, V=128,256 in fp32, fp16 and bf16 (and fp64 at B=16)
  against ``torch.argmax`` (the commit of the argmax through the plain-PyTorch reference);
* ``sampling`` / ``tree``: the sampling and tree sampling ops at V=128,256, CUDA against the CPU op
  bit for bit, with ``torch.cuda.mem_get_info()`` around the first tree launch (a kernel's per-thread
  stack is reserved for every resident thread of the GPU at its first launch);
* ``triton``: Triton attention at head_dim 256 and group 16 (fp32, fp16, bf16) against float64;
* ``overflow`` (``--overflow-probe``, run in its own process: it allocates ~10 GB): attention over
  a cache whose rows pass 2**31 elements (32 kv heads x 128, 600k cached rows).

Each check is a function that raises on failure; ``main`` runs them, skips them all cleanly without a
GPU, and writes a JSON of the results. pytest collects them too (``pytest python/benchmarks/gpu_checks.py``).

    python python/benchmarks/gpu_checks.py --json OUT.json [--overflow-probe]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from jacobi_engine import ops, reference, triton_attention

VOCAB = 128256
MiB = 1 << 20


class Skip(Exception):
    pass


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        try:
            import pytest
        except ImportError:  # pragma: no cover
            raise Skip("no CUDA device") from None
        pytest.skip("no CUDA device")


def _target(tokens, lengths, done, eos_ids, limits, cache_seqlens, chunked=False):
    return ops.CommitTarget(tokens, lengths, done, eos_ids, limits, cache_seqlens, chunked)


def _clone(values: dict, device) -> dict:
    return {k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in values.items()}


# -- verify_and_commit against torch.argmax ----------------------------------------------------------
def check_verify(details: dict) -> None:
    _require_cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    for dtype, batch in ((torch.float32, 64), (torch.float16, 64), (torch.bfloat16, 64), (torch.float64, 16)):
        n = 32
        logits = torch.randn((batch, n, VOCAB), generator=generator, device="cuda").to(dtype)
        # Exact ties at the top (lower index must win) in a quarter of the rows.
        tie = torch.randint(0, VOCAB, (batch, n, 2), generator=generator, device="cuda").sort(-1).values
        rows = torch.rand((batch, n), generator=generator, device="cuda") < 0.25
        top = logits.amax(-1, keepdim=True) + 1
        logits.scatter_(-1, tie, torch.where(rows[..., None], top.expand(-1, -1, 2), logits.gather(-1, tie)))
        preds = logits.argmax(-1)
        agree = torch.rand((batch, n), generator=generator, device="cuda") < 0.7
        guesses = torch.randint(0, VOCAB, (batch, n), generator=generator, device="cuda")
        block = torch.cat([preds[:, :1], torch.where(agree[:, 1:], preds[:, :-1], guesses[:, 1:])], dim=1)
        width = 4 * n
        state = dict(
            block=block,
            fill=torch.randint(0, VOCAB, (batch, n), generator=generator, device="cuda"),
            tokens=torch.full((batch, width), -7, dtype=torch.long, device="cuda"),
            lengths=torch.randint(0, 2 * n, (batch,), generator=generator, device="cuda").to(torch.int32),
            done=torch.zeros(batch, dtype=torch.bool, device="cuda"),
            eos_ids=torch.tensor([int(preds[0, n // 2]), VOCAB - 1], device="cuda"),
            limits=torch.full((batch,), width, dtype=torch.int32, device="cuda"),
            cache_seqlens=torch.randint(0, 4000, (batch,), generator=generator, device="cuda").to(torch.int32),
        )
        ours, expected = _clone(state, "cuda"), _clone(state, "cuda")
        names = ("tokens", "lengths", "done", "eos_ids", "limits", "cache_seqlens")
        accepted = ops.verify_and_commit(logits, ours["block"], ours["fill"], _target(*(ours[k] for k in names)))
        want = reference.verify_and_commit(
            preds, expected["block"], expected["fill"], _target(*(expected[k] for k in names))
        )
        assert torch.equal(accepted, want), f"{dtype}: accepted counts differ from torch.argmax's commit"
        for name in ("block", "tokens", "lengths", "done", "cache_seqlens"):
            assert torch.equal(ours[name], expected[name]), f"{dtype}: {name} differs from torch.argmax's commit"
        details[str(dtype)] = dict(batch=batch, n=n, vocab=VOCAB, mean_accepted=float(accepted.float().mean()))


# -- the sampling ops, CUDA against CPU bit for bit -----------------------------------------------------
def _sampling_inputs(batch, n, nodes, width, seed, candidates=None):
    generator = torch.Generator().manual_seed(seed)
    probs = (torch.randn((batch, nodes, VOCAB), generator=generator) * 3).softmax(-1)
    likely = probs.argmax(-1)
    block = torch.randint(0, VOCAB, (batch, n), generator=generator)
    block = torch.where(torch.rand((batch, n), generator=generator) < 0.6, likely[:, :n].roll(1, 1), block)
    case = dict(
        probs=probs,
        block=block,
        fill=torch.randint(0, VOCAB, (batch, width), generator=generator),
        proposal=(torch.randn((batch, n, VOCAB), generator=generator) * 3).softmax(-1),
        draft_sampled=torch.rand((batch, n), generator=generator) < 0.5,
        n_fixed=torch.zeros(batch, dtype=torch.int32),
        seed=torch.tensor([1234]),
        sequence_ids=torch.arange(batch),
        step=torch.tensor([7]),
        tokens=torch.full((batch, 8 * n), -7),
        lengths=torch.full((batch,), 3, dtype=torch.int32),
        done=torch.zeros(batch, dtype=torch.bool),
        eos_ids=torch.tensor([-1]),
        limits=torch.full((batch,), 8 * n, dtype=torch.int32),
        cache_seqlens=torch.full((batch,), 100, dtype=torch.int32),
    )
    if candidates is not None:
        k, g = candidates
        parents = torch.cat([likely[:, :1, None].expand(-1, k, 1), likely[:, n:].reshape(batch, k, g)[..., :-1]], 2)
        random_tokens = torch.randint(0, VOCAB, (batch, k, g), generator=generator)
        case["candidates"] = torch.where(torch.rand((batch, k, g), generator=generator) < 0.6, parents, random_tokens)
        case["usable"] = torch.ones((batch, k), dtype=torch.bool)
        case["row"] = torch.full((batch, width), -5)
    return case


def _run_sampling(case: dict):
    sampling = ops.SamplingState(
        *(case[k] for k in ("proposal", "draft_sampled", "n_fixed", "seed", "sequence_ids")), case["step"]
    )
    target = _target(*(case[k] for k in ("tokens", "lengths", "done", "eos_ids", "limits", "cache_seqlens")))
    if "candidates" in case:
        tree = (case["probs"], case["block"], case["candidates"], case["usable"], case["row"], case["fill"])
        result = ops.sample_tree_verify_and_commit(*tree, sampling, target, backend="native")
    else:
        result = (ops.sample_verify_and_commit(case["probs"], case["block"], case["fill"], sampling, target),)
    return [r.cpu() for r in result], target.errors


def _compare_devices(case: dict, label: str) -> dict:
    cpu, cuda = _clone(case, "cpu"), _clone(case, "cuda")
    cpu_result, _ = _run_sampling(cpu)
    cuda_result, errors = _run_sampling(cuda)
    torch.cuda.synchronize()
    for index, (a, b) in enumerate(zip(cpu_result, cuda_result)):
        assert torch.equal(a, b), f"{label}: result {index} differs between CPU and CUDA"
    for name, value in cpu.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, cuda[name].cpu()), f"{label}: {name} differs between CPU and CUDA"
    assert int(errors[0]) == 0, f"{label}: the CUDA op flagged errors {ops.error_messages(int(errors[0]))}"
    return dict(mean_accepted=float(cpu_result[0].float().mean()))


def check_tree(details: dict) -> None:
    """Run first in its process: the first tree launch shows the per-thread stack reservation."""
    _require_cuda()
    batch, n, k, g = 8, 8, 4, 4
    case = _sampling_inputs(batch, n, n + k * g, max(n, g + 1), seed=2, candidates=(k, g))
    cuda = _clone(case, "cuda")
    torch.cuda.synchronize()
    free_before, total = torch.cuda.mem_get_info()
    reserved_before = torch.cuda.memory_reserved()
    _run_sampling(cuda)
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    outside_allocator = (free_before - free_after) - (torch.cuda.memory_reserved() - reserved_before)
    details["first_launch_driver_MiB"] = round(outside_allocator / MiB, 1)
    details["gpu_total_MiB"] = round(total / MiB)
    # The old tree kernel's 3,968-byte stack reserved about 1 GB here; the new one reserves < 100 MiB.
    assert outside_allocator < 256 * MiB, f"first tree launch took {outside_allocator / MiB:.0f} MiB outside torch"
    details.update(_compare_devices(case, "tree"))
    chunked = _sampling_inputs(4, 6, 6 + 3 * 4, 6, seed=3, candidates=(3, 4))
    chunked["n_fixed"] = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    details["chunked_fixed"] = _compare_devices(chunked, "tree (fixed slots)")


def check_sampling(details: dict) -> None:
    _require_cuda()
    for batch, n in ((8, 16), (2, 32)):
        details[f"B{batch}_n{n}"] = _compare_devices(_sampling_inputs(batch, n, n, n, seed=batch), "sampling")


# -- Triton attention at head_dim 256, group 16, against float64 ------------------------------------------
def _float64_attention(q, k_cache, v_cache, k_new, v_new, cache_seqlens, scale):
    batch, n, n_heads, _ = q.shape
    group = n_heads // k_cache.shape[2]
    out = torch.empty((batch, n, n_heads, v_cache.shape[3]), dtype=torch.float64, device=q.device)
    for b in range(batch):
        prefix = int(cache_seqlens[b])
        keys = torch.cat([k_cache[b, :prefix], k_new[b]]).double()
        values = torch.cat([v_cache[b, :prefix], v_new[b]]).double()
        visible = (
            torch.arange(prefix + n, device=q.device)[None, :] <= prefix + torch.arange(n, device=q.device)[:, None]
        )
        for h in range(n_heads):
            scores = (q[b, :, h].double() @ keys[:, h // group].T * scale).masked_fill(~visible, float("-inf"))
            out[b, :, h] = torch.softmax(scores, dim=-1) @ values[:, h // group]
    return out


def check_triton(details: dict) -> None:
    _require_cuda()
    tolerances = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    generator = torch.Generator(device="cuda").manual_seed(5)
    for dtype in tolerances:
        for batch, n, capacity in ((3, 1, 2048), (2, 16, 1024), (2, 64, 300)):
            kv_heads, group, dim = 2, 16, 256
            heads = kv_heads * group

            def randn(*shape):
                return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

            q = randn(batch, heads, n, dim).transpose(1, 2)
            k_new, v_new = (
                randn(batch, kv_heads, n, dim).transpose(1, 2),
                randn(batch, kv_heads, n, dim).transpose(1, 2),
            )
            k_cache, v_cache = randn(batch, capacity, kv_heads, dim), randn(batch, capacity, kv_heads, dim)
            seqlens = torch.randint(0, capacity - n + 1, (batch,), generator=generator, device="cuda").to(torch.int32)
            seqlens[0] = capacity - n
            scale = dim**-0.5
            expected = _float64_attention(q, k_cache, v_cache, k_new, v_new, seqlens, scale)
            out = ops.jacobi_attention(q, k_cache, v_cache, k_new, v_new, seqlens, scale, backend="triton")
            error = float((out.double() - expected).abs().max())
            tolerance = tolerances[dtype] * max(1.0, float(expected.abs().max()))
            assert error <= tolerance, f"{dtype} B{batch} n{n} S{capacity}: max error {error:.3g} > {tolerance:.3g}"
            for b in range(batch):
                rows = slice(int(seqlens[b]), int(seqlens[b]) + n)
                assert torch.equal(k_cache[b, rows], k_new[b]) and torch.equal(v_cache[b, rows], v_new[b])
            details[f"{dtype}_B{batch}_n{n}_S{capacity}"] = error


# -- offsets past 2**31 elements (own process) -------------------------------------------------------------
def check_overflow(details: dict) -> None:
    """A cache of 600,008 rows x 32 kv heads x 128 (2.46e9 elements per buffer, fp16): keys and the
    block are zero, so every visible row weighs the same; values are 1 on 10 rows past element 2**31
    and 0 elsewhere. Every output element is then 10 / (visible rows), a wrapped offset reads zeros,
    and the appended rows must land at 600,000 + i."""
    _require_cuda()
    rows, kv_heads, dim, n, group = 600_008, 32, 128, 4, 1
    prefix = 600_000
    assert prefix * kv_heads * dim > 2**31
    k_cache = torch.zeros((1, rows, kv_heads, dim), dtype=torch.float16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    marked = slice(550_000, 550_010)  # row 550,000 starts at element 2.25e9 > 2**31
    v_cache[0, marked] = 1.0
    q = torch.randn((1, n, kv_heads * group, dim), dtype=torch.float16, device="cuda")
    k_new = torch.zeros((1, n, kv_heads, dim), dtype=torch.float16, device="cuda")
    v_new = torch.full((1, n, kv_heads, dim), 2.0, dtype=torch.float16, device="cuda")
    seqlens = torch.tensor([prefix], dtype=torch.int32, device="cuda")
    for num_splits in (1, None):
        k_cache[0, prefix:] = 0
        v_cache[0, prefix:] = 0
        out = triton_attention.jacobi_attention(
            q, k_cache, v_cache, k_new, v_new, seqlens, dim**-0.5, num_splits=num_splits
        )
        visible = prefix + torch.arange(1, n + 1, device="cuda", dtype=torch.float64)
        expected = (10.0 + 2.0 * torch.arange(1, n + 1, device="cuda", dtype=torch.float64)) / visible
        error = float((out.double() - expected[None, :, None, None]).abs().max())
        assert error < 1e-5, f"num_splits={num_splits}: max error {error:.3g} (a wrapped offset reads other rows)"
        assert bool((v_cache[0, prefix : prefix + n] == 2.0).all()), (
            "the block's values were not appended at row 600,000"
        )
        assert (
            bool((v_cache[0, marked] == 1.0).all()) and int(v_cache[0, :prefix].count_nonzero()) == 10 * kv_heads * dim
        )
        details[f"splits_{num_splits}"] = error
    del k_cache, v_cache
    torch.cuda.empty_cache()


CHECKS = {"tree": check_tree, "sampling": check_sampling, "verify": check_verify, "triton": check_triton}


# pytest entry points (collected by `pytest python/benchmarks/gpu_checks.py`).
def test_tree():
    check_tree({})


def test_sampling():
    check_sampling({})


def test_verify():
    check_verify({})


def test_triton():
    check_triton({})


def test_overflow():
    check_overflow({})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--overflow-probe", action="store_true", help="run only the ~10 GB overflow probe")
    args = parser.parse_args()
    checks = {"overflow": check_overflow} if args.overflow_probe else CHECKS
    results, failed = {}, 0
    for name, check in checks.items():
        details: dict = {}
        started = time.perf_counter()
        try:
            if not torch.cuda.is_available():
                raise Skip("no CUDA device")
            check(details)
            status = "passed"
        except Skip as skip:
            status, details["reason"] = "skipped", str(skip)
        except Exception:  # every check runs and reports, whatever the others did
            status, details["error"] = "failed", traceback.format_exc(limit=4)
            failed += 1
        seconds = round(time.perf_counter() - started, 2)
        results[name] = dict(status=status, seconds=seconds, details=details)
        print(
            f"{name:<10} {status:<8} {seconds:>7.2f} s  {details.get('reason', details.get('error', '')).strip()[-400:]}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
