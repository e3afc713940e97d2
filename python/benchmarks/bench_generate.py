"""End-to-end generation benchmark on held-out GSM8K questions, everything side by side in one process.

    python python/benchmarks/bench_generate.py --json OUT.json [--prompts FILE.jsonl] [--limit N]

Rows (batch size 1, greedy, the same questions for every row; each model is run with every method):
    hf_greedy            model.generate(do_sample=False)
    hf_prompt_lookup     model.generate(do_sample=False, prompt_lookup_num_tokens=10)
    hf_static_compile    model.generate(do_sample=False, cache_implementation="static") with HF's compiled
                         decoding forward (compile_config: torch.compile, static shapes), HF's fast path
    engine_ar            JacobiEngine(block_size=1)                      (teacher)
    engine_jacobi        JacobiEngine(block_size=n)
    engine_jacobi_ngram  JacobiEngine(block_size=n, init="ngram")
    engine_pool          JacobiEngine(block_size=n, init="ngram", candidates=k, candidate_len=g)  (--pool K G)
Every engine row runs twice, eagerly ("compile": false) and with JacobiEngine(compile=True) ("compile": true).
Compiled rows (HF's and ours) are warmed up on the longest prompt first, so that the timed loop
reuses one graph; ``recompiles`` counts the graphs dynamo still compiled during the timed loop.
The timed loop is interleaved: question by question, every method in turn (see ``run_methods``).

Columns: tokens_per_s (new tokens / wall time, prefill included), tokens_per_forward (new tokens /
model forward calls: counted with a forward hook for HF's methods, by the engine's own
``stats.forward_passes`` for ours, which a hook cannot see inside a compiled step),
quality (final-answer accuracy in points, the number after ``####``), perplexity (of the reference
answers under that model, answer tokens only, conditioned on the prompt), agreement (fraction of
generated tokens equal to the same model's HF greedy output, position by position).
Speedups: ``speedup_vs_own_greedy`` divides by the same model's HF greedy tokens/s (the lossless
speedup: same model, same output); ``speedup_vs_teacher_greedy`` by the teacher's (the CLLM paper's
measure, which compares two different models: see ``cllm_teacher_agreement`` in the JSON);
``speedup_vs_own_prompt_lookup`` by the same model's HF prompt lookup.

Sampling rows (``--sampling on|only|off``; batch size 1, pure temperature sampling: top_k=0,
top_p=1.0, at T=0.7 and T=1.0, on both models):
    hf_sample                model.generate(do_sample=True, temperature=T, top_k=0)
    engine_sample_sjd        JacobiEngine(block_size=n), SJD ratio rule for Jacobi drafts
    engine_sample_one_hot    JacobiEngine(block_size=n, sampling_rule="one_hot")
    engine_sample_sjd_ngram  JacobiEngine(block_size=n, init="ngram")
Every row draws from the same distribution (the model's, exactly); ``speedup_vs_own_sampling``
divides by the same model's hf_sample tokens/s at the same temperature; accuracy is that of the
samples.

Default questions: the held-out split (shipped in the package), never trained on. --prompts
takes a JSONL file of {"question", "answer"} lines in the training data's format instead.
Also writes a PNG plot next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from jacobi_engine import JacobiEngine, build_info
from jacobi_engine.demo import ASSETS
from jacobi_engine.gsm8k import extract_final_answer, format_prompt, load_jsonl_gz, repo_data_path


def load_pair(teacher_dir: str, cllm_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    models = {
        name: AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        for name, path in (("teacher", teacher_dir), ("cllm", cllm_dir))
    }
    return tokenizer, models


def load_questions(path: str | None, limit: int | None) -> list[dict]:
    if path is None:
        records = load_jsonl_gz(repo_data_path("eval"))
    else:
        with open(path) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        for number, record in enumerate(records, 1):
            if "question" not in record or "answer" not in record:
                raise SystemExit(f"{path}:{number}: each line needs a 'question' and an 'answer'")
    return records[:limit] if limit else records


class ForwardCounter:
    """Counts forward calls of a model (prefill and decode alike) with a forward hook."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def close(self):
        self.handle.remove()


@torch.inference_mode()
def answer_perplexity(model, tokenizer, records: list[dict]) -> float:
    """exp(mean NLL) of the reference answers' tokens (and the closing EOS is not counted)."""
    total_nll, total_tokens = 0.0, 0
    for record in records:
        prompt_ids = tokenizer(format_prompt(record["question"]))["input_ids"]
        answer_ids = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
        targets = torch.tensor(answer_ids)
        total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        total_tokens += len(answer_ids)
    return math.exp(total_nll / total_tokens)


class Method:
    """One row's way of generating: ``__call__(input_ids)`` -> (new token ids, model forwards)."""

    def __init__(self, name: str, model, tokenizer, max_new_tokens: int, block_size: int, compile: bool, pool=(2, 8)):
        self.name, self.model = name, model
        self.max_new_tokens = max_new_tokens
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.engine = None
        if name == "engine_ar":
            self.engine = JacobiEngine(model, block_size=1, compile=compile)
        elif name == "engine_jacobi":
            self.engine = JacobiEngine(model, block_size=block_size, compile=compile)
        elif name == "engine_jacobi_ngram":
            self.engine = JacobiEngine(model, block_size=block_size, init="ngram", compile=compile)
        elif name == "engine_pool":
            k, g = pool
            self.engine = JacobiEngine(
                model, block_size=block_size, init="ngram", candidates=k, candidate_len=g, compile=compile
            )
        self.extra = {}
        if name == "hf_prompt_lookup":
            self.extra = {"prompt_lookup_num_tokens": 10}
        elif name == "hf_static_compile":
            from transformers import CompileConfig

            # HF compiles the decoding forward by itself on GPUs; this flag asks for it on CPU too.
            # "reduce-overhead" (CUDA graphs) is HF's default and only means something on CUDA.
            mode = "reduce-overhead" if model.device.type == "cuda" else "default"
            compile_config = CompileConfig(dynamic=False, mode=mode)
            compile_config._compile_all_devices = True
            self.extra = {"cache_implementation": "static", "compile_config": compile_config}

    def __call__(self, input_ids: torch.Tensor) -> tuple[list[int], int]:
        if self.engine is not None:
            # The engine counts its forwards itself: a hook added after torch.compile traced the model
            # would not run inside the compiled step.
            out = self.engine.generate(
                input_ids, max_new_tokens=self.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad
            )
            return out.sequences[0, input_ids.shape[1] :].tolist(), out.stats.forward_passes
        # The hook is attached only around HF's own calls: present while a step is compiled, it would be
        # traced into the graph, whose guard on its Python counter then fails at every step.
        counter = ForwardCounter(self.model)
        try:
            sequences = self.model.generate(
                input_ids,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                **self.extra,
            )
        finally:
            counter.close()
        return sequences[0, input_ids.shape[1] :].tolist(), counter.calls


def run_methods(
    plan, models, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int, block_size: int, pool=(2, 8)
) -> dict:
    """Every method of ``plan`` on every prompt, interleaved: question by question, each method in turn.

    On a shared machine, load that comes and goes then falls on every method alike, so the rows of one
    run compare fairly. Returns {(method, model, compile): (outputs, seconds, forwards, recompiles)}.
    """
    from torch._dynamo.utils import counters

    methods = {key: Method(key[0], models[key[1]], tokenizer, max_new_tokens, block_size, key[2], pool) for key in plan}
    longest = max(prompts, key=lambda ids: ids.shape[1])
    for key, method in methods.items():
        # Warm-up (and compile); compiled rows on the longest prompt so that caches are sized once.
        method(longest if (key[2] or method.extra.get("cache_implementation")) else prompts[0])
    results = {key: ([], 0.0, 0, 0) for key in plan}
    for input_ids in prompts:
        for key, method in methods.items():
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            tokens, forwards = method(input_ids)
            seconds = time.perf_counter() - start
            outputs, total, calls, recompiles = results[key]
            outputs.append(tokens)
            results[key] = (
                outputs,
                total + seconds,
                calls + forwards,
                recompiles + counters["stats"]["unique_graphs"] - graphs,
            )
    return results


SAMPLING_METHODS = ("hf_sample", "engine_sample_sjd", "engine_sample_one_hot", "engine_sample_sjd_ngram")


def run_sampling_method(name: str, model, tokenizer, prompts, max_new_tokens: int, block_size: int, temperature):
    """Sample every prompt at batch size 1; returns (generated id lists, seconds, forward calls)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    warpers = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    engine = None
    if name == "engine_sample_sjd":
        engine = JacobiEngine(model, block_size=block_size)
    elif name == "engine_sample_one_hot":
        engine = JacobiEngine(model, block_size=block_size, sampling_rule="one_hot")
    elif name == "engine_sample_sjd_ngram":
        engine = JacobiEngine(model, block_size=block_size, init="ngram")

    def generate(input_ids):
        if engine is not None:
            return engine.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                return_stats=False,
                **warpers,
            ).sequences
        return model.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **warpers)

    generate(prompts[0])  # warm-up
    torch.manual_seed(0)  # HF's sampler draws from torch's global generator; the engine from its seed
    counter = ForwardCounter(model)
    outputs, start = [], time.perf_counter()
    for input_ids in prompts:
        sequences = generate(input_ids)
        outputs.append(sequences[0, input_ids.shape[1] :].tolist())
    seconds = time.perf_counter() - start
    counter.close()
    return outputs, seconds, max(counter.calls, 1)


def sampling_rows(models, tokenizer, prompts, records, max_new_tokens: int, block_size: int) -> list[dict]:
    rows = []
    for temperature in (0.7, 1.0):
        for model_name in ("teacher", "cllm"):
            for method in SAMPLING_METHODS:
                outputs, seconds, calls = run_sampling_method(
                    method, models[model_name], tokenizer, prompts, max_new_tokens, block_size, temperature
                )
                tokens = sum(len(o) for o in outputs)
                rows.append(
                    dict(
                        method=method,
                        model=model_name,
                        temperature=temperature,
                        tokens_per_s=tokens / seconds,
                        tokens_per_forward=tokens / calls,
                        quality=accuracy(outputs, tokenizer, records),
                        tokens=tokens,
                        seconds=seconds,
                        forwards=calls,
                    )
                )
                print(
                    f"T={temperature} {method:<24} {model_name:<8} {tokens / seconds:8.1f} tok/s "
                    f"{tokens / calls:5.2f} tok/forward",
                    flush=True,
                )
    rate = {(r["method"], r["model"], r["temperature"]): r["tokens_per_s"] for r in rows}
    for row in rows:
        row["speedup_vs_own_sampling"] = row["tokens_per_s"] / rate[("hf_sample", row["model"], row["temperature"])]
    print("\n| T | method | model | tokens/s | tokens/forward | accuracy (pts) | vs own HF sampling |\n|" + "---|" * 7)
    for r in rows:
        print(
            f"| {r['temperature']} | {r['method']} | {r['model']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_forward']:.2f} | {r['quality']:.1f} | {r['speedup_vs_own_sampling']:.2f}x |"
        )
    return rows


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    same = total = 0
    for ours, theirs in zip(outputs, reference):
        total += len(theirs)
        same += sum(a == b for a, b in zip(ours, theirs))
    return same / total if total else 1.0


def accuracy(outputs: list[list[int]], tokenizer, records: list[dict]) -> float:
    correct = 0
    for tokens, record in zip(outputs, records):
        predicted = extract_final_answer(tokenizer.decode(tokens, skip_special_tokens=True))
        correct += predicted is not None and predicted == extract_final_answer(record["answer"])
    return 100.0 * correct / len(records)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}{' (compiled)' if r['compile'] else ''}\n({r['model']})" for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].bar(labels, [r["tokens_per_s"] for r in rows], color="#1976d2")
    axes[0].set_ylabel("tokens / s (batch 1)")
    axes[1].bar(labels, [r["tokens_per_forward"] for r in rows], color="#388e3c")
    axes[1].set_ylabel("tokens / forward")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    figure.suptitle("Held-out GSM8K: greedy, prompt lookup and Jacobi decoding")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here (and a .png next to it)")
    parser.add_argument("--prompts", help='JSONL of {"question", "answer"} (default: held-out GSM8K)')
    parser.add_argument("--teacher", default=str(ASSETS / "teacher"))
    parser.add_argument("--cllm", default=str(ASSETS / "cllm"))
    parser.add_argument("--limit", type=int, default=100, help="questions to generate for (0: all)")
    parser.add_argument("--block-size", type=int, default=None, help="default: the CLLM's training block size")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (HF's and ours)")
    parser.add_argument(
        "--pool", type=int, nargs=2, default=(2, 8), metavar=("K", "G"), help="engine_pool candidates (bench_pool.py)"
    )
    parser.add_argument(
        "--sampling", choices=("on", "only", "off"), default="on", help="the sampling rows: with, only, or without"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer, models = load_pair(args.teacher, args.cllm)
    block_size = args.block_size or getattr(models["cllm"].config, "jacobi_block_size", None) or 16
    records = load_questions(args.prompts, args.limit or None)
    prompts = [tokenizer(format_prompt(r["question"]), return_tensors="pt").input_ids for r in records]
    perplexity = {name: answer_perplexity(model, tokenizer, records) for name, model in models.items()}
    sampled = []
    if args.sampling != "off":
        sampled = sampling_rows(models, tokenizer, prompts, records, args.max_new_tokens, block_size)
    if args.sampling == "only":
        return write_result(args, records, block_size, dict(sampling_rows=sampled))

    plan = [
        ("hf_greedy", "teacher", False),
        ("hf_prompt_lookup", "teacher", False),
        ("hf_static_compile", "teacher", True),
        ("engine_ar", "teacher", False),
        ("engine_ar", "teacher", True),
        ("engine_jacobi", "teacher", False),
        ("engine_jacobi", "teacher", True),
        ("engine_jacobi_ngram", "teacher", False),
        ("engine_jacobi_ngram", "teacher", True),
        ("engine_pool", "teacher", False),
        ("engine_pool", "teacher", True),
        # The CLLM's own greedy output: its baseline and the reference for agreement.
        ("hf_greedy", "cllm", False),
        ("hf_prompt_lookup", "cllm", False),
        ("hf_static_compile", "cllm", True),
        ("engine_jacobi", "cllm", False),
        ("engine_jacobi", "cllm", True),
        ("engine_jacobi_ngram", "cllm", False),
        ("engine_jacobi_ngram", "cllm", True),
        ("engine_pool", "cllm", False),
        ("engine_pool", "cllm", True),
    ]
    if args.no_compile:
        plan = [entry for entry in plan if not entry[2]]
    results = run_methods(plan, models, tokenizer, prompts, args.max_new_tokens, block_size, tuple(args.pool))
    greedy = {model_name: results[("hf_greedy", model_name, False)][0] for model_name in models}
    for (method, model_name, compiled), (outputs, seconds, calls, _) in results.items():
        tokens = sum(len(o) for o in outputs)
        print(
            f"{method:<20} {model_name:<8} compile={compiled!s:<5} {tokens / seconds:8.1f} tok/s "
            f"{tokens / calls:5.2f} tok/forward",
            flush=True,
        )

    rows = []
    for (method, model_name, compiled), (outputs, seconds, calls, recompiles) in results.items():
        tokens = sum(len(o) for o in outputs)
        rows.append(
            dict(
                method=method,
                model=model_name,
                compile=compiled,
                recompiles=recompiles,
                tokens_per_s=tokens / seconds,
                tokens_per_forward=tokens / calls,
                quality=accuracy(outputs, tokenizer, records),
                perplexity=perplexity[model_name],
                agreement=agreement(outputs, greedy[model_name]),
                tokens=tokens,
                seconds=seconds,
                forwards=calls,
            )
        )
    rate = {
        (r["method"], r["model"]): r["tokens_per_s"] for r in rows if not r["compile"] or r["method"].startswith("hf")
    }
    for row in rows:
        row["speedup_vs_own_greedy"] = row["tokens_per_s"] / rate[("hf_greedy", row["model"])]
        row["speedup_vs_teacher_greedy"] = row["tokens_per_s"] / rate[("hf_greedy", "teacher")]
        row["speedup_vs_own_prompt_lookup"] = row["tokens_per_s"] / rate[("hf_prompt_lookup", row["model"])]
        if ("hf_static_compile", row["model"]) in rate:
            row["speedup_vs_own_hf_static_compile"] = row["tokens_per_s"] / rate[("hf_static_compile", row["model"])]
    cllm_teacher_agreement = agreement(greedy["cllm"], greedy["teacher"])

    header = (
        "| method | model | compile | tokens/s | tokens/forward | accuracy (pts) | perplexity | agreement | "
        "vs own HF greedy | vs own HF static+compile | vs own prompt lookup | vs teacher HF greedy |"
    )
    print("\n" + header + "\n|" + "---|" * 12)
    for r in rows:
        static = r.get("speedup_vs_own_hf_static_compile")
        print(
            f"| {r['method']} | {r['model']} | {'yes' if r['compile'] else 'no'} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_forward']:.2f} | {r['quality']:.1f} | {r['perplexity']:.3f} | {r['agreement']:.3f} | "
            f"{r['speedup_vs_own_greedy']:.2f}x | {'-' if static is None else f'{static:.2f}x'} | "
            f"{r['speedup_vs_own_prompt_lookup']:.2f}x | {r['speedup_vs_teacher_greedy']:.2f}x |"
        )
    print(f"\nCLLM greedy output vs teacher greedy output: {cllm_teacher_agreement:.3f} of tokens agree")
    png = str(Path(args.json).with_suffix(".png"))
    plot([r for r in rows if not (r["method"] == "hf_greedy" and r["model"] == "cllm")], png)
    extra = dict(cllm_teacher_agreement=cllm_teacher_agreement, rows=rows, sampling_rows=sampled)
    return write_result(args, records, block_size, extra)


def write_result(args, records, block_size: int, extra: dict) -> int:
    result = dict(
        command=" ".join(["python"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=dict(
            platform=platform.platform(),
            python=platform.python_version(),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cpu_count=os.cpu_count(),
            jacobi_engine=build_info(),
        ),
        questions=len(records),
        source=args.prompts or "jacobi_engine/assets/gsm8k/eval.jsonl.gz (held out)",
        block_size=block_size,
        pool=dict(candidates=args.pool[0], candidate_len=args.pool[1]),
        max_new_tokens=args.max_new_tokens,
        **extra,
    )
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
