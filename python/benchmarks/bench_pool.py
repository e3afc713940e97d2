"""Sweep of the multi-candidate pool on the shipped CLLM: block size n, candidates k, length g.

    python python/benchmarks/bench_pool.py --json OUT.json [--pair gsm8k|code] [--limit N] [--max-new-tokens N] [--threads 1]

Every configuration decodes the same held-out prompts of the pair (``--pair``, default gsm8k: its
CLLM is the default --model, its held-out split and prompt format come from jacobi_engine.domains;
prompts too long for the model's positions are skipped) at batch size 1 (greedy; each
engine's output is checked against the CLLM's own HF greedy output, and must agree on 100% of the
tokens). Reports tokens per forward (new tokens / model calls, counted with a forward hook) and
tokens/s, against T = n + k * g, the tokens each forward processes. HF greedy on the same model,
in the same run, is the baseline of the speedup column. Writes JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from bench_generate import (  # sys.path: this folder
    ForwardCounter,
    fit_context,
    format_chat,
    load_records,
    max_positions,
    model_dir,
)

from jacobi_engine import JacobiEngine, build_info, domains

DEFAULT_GRID = dict(n=[4, 8, 16], k=[0, 2, 4, 8], g=[4, 8])


def run(model, prompts, max_new_tokens, eos, pad, engine_kwargs):
    engine = JacobiEngine(model, **engine_kwargs) if engine_kwargs is not None else None

    def generate(input_ids):
        if engine is None:
            return model.generate(
                input_ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad
            )
        return engine.generate(
            input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, return_stats=False
        ).sequences

    generate(prompts[0])  # warm-up
    counter = ForwardCounter(model)
    outputs, start = [], time.perf_counter()
    for input_ids in prompts:
        outputs.append(generate(input_ids)[0, input_ids.shape[1] :].tolist())
    seconds = time.perf_counter() - start
    counter.close()
    return outputs, seconds, counter.calls


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in sorted({r["n"] for r in rows if r["n"]}):
        for g in sorted({r["g"] for r in rows if r["n"] == n}):
            series = sorted((r for r in rows if r["n"] == n and r["g"] == g), key=lambda r: r["tokens_in_forward"])
            label = f"n={n}, g={g}"
            xs = [r["tokens_in_forward"] for r in series]
            axes[0].plot(xs, [r["tokens_per_forward"] for r in series], marker="o", label=label)
            axes[1].plot(xs, [r["speedup_vs_own_greedy"] for r in series], marker="o", label=label)
    axes[0].set_ylabel("tokens / forward")
    axes[1].set_ylabel("tokens/s vs the CLLM's HF greedy")
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("tokens per forward pass (n + k*g; k = 0, 2, 4, 8 along each line)")
        ax.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--pair", choices=domains.PAIRS, default="gsm8k", help="reference pair: model and prompts")
    parser.add_argument("--model", help="model directory (default: the pair's shipped CLLM)")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--init", default="random_prompt", choices=["random_prompt", "ngram"])
    parser.add_argument("--n", type=int, nargs="+", default=DEFAULT_GRID["n"])
    parser.add_argument("--k", type=int, nargs="+", default=DEFAULT_GRID["k"])
    parser.add_argument("--g", type=int, nargs="+", default=DEFAULT_GRID["g"])
    args = parser.parse_args(argv)
    domain = domains.get_domain(args.pair)
    name = "the shipped CLLM" if args.model is None else Path(args.model).name
    args.model = model_dir(args.model, "cllm", domain)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32).eval()
    limit = max_positions({"model": model})
    records = load_records(None, domain)
    format_chat(records, tokenizer, domain)
    records, skipped = fit_context(
        records, tokenizer, args.max_new_tokens, limit, answers=False, add_special_tokens=not domain.chat
    )
    records = records[: args.limit]
    prompts = [domain.encode(tokenizer, r["prompt"], return_tensors="pt") for r in records]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy, greedy_seconds, _ = run(model, prompts, args.max_new_tokens, eos, pad, None)
    greedy_tokens = sum(len(o) for o in greedy)
    greedy_rate = greedy_tokens / greedy_seconds
    print(f"hf_greedy: {greedy_rate:.1f} tok/s", flush=True)
    rows = []
    for n, k, g in itertools.product(args.n, args.k, args.g):
        if k == 0 and g != args.g[0]:
            continue  # g is meaningless without candidates
        kwargs = dict(block_size=n, candidates=k, candidate_len=g, init=args.init)
        outputs, seconds, calls = run(model, prompts, args.max_new_tokens, eos, pad, kwargs)
        tokens = sum(len(o) for o in outputs)
        same = sum(a == b for ours, theirs in zip(outputs, greedy) for a, b in zip(ours, theirs))
        row = dict(
            n=n,
            k=k,
            g=g if k else 0,
            tokens_in_forward=n + k * g,
            tokens_per_forward=tokens / calls,
            tokens_per_s=tokens / seconds,
            speedup_vs_own_greedy=(tokens / seconds) / greedy_rate,
            agreement=same / max(greedy_tokens, 1),
        )
        rows.append(row)
        print(
            f"n={n:<3} k={k:<2} g={row['g']:<2} T={row['tokens_in_forward']:<4} "
            f"{row['tokens_per_forward']:.2f} tok/forward {row['tokens_per_s']:7.1f} tok/s "
            f"({row['speedup_vs_own_greedy']:.2f}x HF greedy) agreement {row['agreement']:.3f}",
            flush=True,
        )
    result = dict(
        command=" ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=dict(
            platform=platform.platform(),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cpu_count=os.cpu_count(),
            jacobi_engine=build_info(),
        ),
        model=args.model,
        pair=domain.name,
        questions=len(records),
        skipped_too_long=skipped,
        max_new_tokens=args.max_new_tokens,
        init=args.init,
        hf_greedy_tokens_per_s=greedy_rate,
        rows=rows,
    )
    Path(args.json).write_text(json.dumps(result, indent=2))
    title = f"Candidate pool on {name} (held-out {domain.title}, batch 1, greedy)"
    plot(rows, str(Path(args.json).with_suffix(".png")), title)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
