"""End-to-end generation benchmark on a reference pair's held-out prompts, everything side by side in one process.

    python python/benchmarks/bench_generate.py --json OUT.json [--pair gsm8k|code] [--prompts FILE.jsonl] [--limit N]

``--pair`` (default gsm8k) picks the shipped pair (jacobi_engine/assets/cllm-{pair}: the default
--teacher and --cllm), its held-out prompts, its prompt format and its quality metric, all from
jacobi_engine.domains: GSM8K questions in ``format_prompt`` and final-answer accuracy; Python code
(a function's signature and docstring, used as is) and exact match of the generated body.

Rows (batch size 1, greedy, the same questions for every row; each model is run with every method):
    hf_greedy            model.generate(do_sample=False)
    hf_prompt_lookup     model.generate(do_sample=False, prompt_lookup_num_tokens=10)
    hf_static_compile    model.generate(do_sample=False, cache_implementation="static") with HF's compiled
                         decoding forward (compile_config: torch.compile, static shapes), HF's fast path
    engine_ar            JacobiEngine(block_size=1)                      (teacher)
    engine_jacobi        JacobiEngine(block_size=n)
    engine_jacobi_ngram  JacobiEngine(block_size=n, init="ngram")
    engine_pool          JacobiEngine(block_size=n, init="ngram", candidates=k, candidate_len=g)  (--pool K G)
    engine_auto          JacobiEngine(model), the defaults: block_size="auto", candidates="auto" (g=4),
                         init="ngram", the step shape chosen per sync from the measured costs (blocks
                         1/2/4/8/16/32 x candidates 0/2/4; compiled: 1/4/16 x 0/2); the shapes chosen
                         over the timed calls are in the JSON (``shapes_chosen``)
Every engine row runs twice, eagerly ("compile": false) and with JacobiEngine(compile=True) ("compile": true).
Compiled rows (HF's and ours) are warmed up on the longest prompt first, so that the timed loop
reuses one graph; ``recompiles`` counts the graphs dynamo still compiled during the timed loop.
The timed loop is interleaved: question by question, every method in turn (see ``run_methods``).

Columns: tokens_per_s (new tokens / wall time, prefill included), tokens_per_forward (new tokens /
model forward calls: counted with a forward hook for HF's methods, by the engine's own
``stats.forward_passes`` for ours, which a hook cannot see inside a compiled step),
quality (in points: GSM8K final-answer accuracy, the number after ``####``; code exact match of
the generated body against the reference body, trailing whitespace ignored; the JSON's
``quality_metric`` names it), perplexity (of the reference answers under that model, answer tokens
only, conditioned on the prompt in the pair's format), agreement (fraction of generated tokens
equal to the same model's HF greedy output, position by position). Quality and perplexity count
the prompts that have a reference answer, and are null when none has.
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
    engine_sample_pool       JacobiEngine(block_size=n, init="ngram", candidates=k, candidate_len=g)  (--pool K G):
                             the pool's branches verified by exact multi-candidate sampling
Every row draws from the same distribution (the model's, exactly); ``speedup_vs_own_sampling``
divides by the same model's hf_sample tokens/s at the same temperature; quality is that of the
samples.

Default prompts: the pair's held-out split (shipped in the package: jacobi_engine/assets/{pair}/
eval.jsonl.gz), never trained on. --prompts takes a JSONL file instead: ``{"prompt"}`` lines (the
prompt text, used as is, for either pair) or, for gsm8k, ``{"question"}`` lines (formatted like the
training data), each with an optional ``"answer"``. Prompts too long for the models' positions
(prompt + --max-new-tokens, or prompt + answer) are skipped and counted (``skipped_too_long``).
Also writes a PNG plot next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from jacobi_engine import JacobiEngine, build_info, domains


def load_pair(teacher_dir: str, cllm_dir: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    models = {
        name: AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).eval()
        for name, path in (("teacher", teacher_dir), ("cllm", cllm_dir))
    }
    return tokenizer, models


def prompt_record(raw, domain: domains.Domain) -> dict:
    """``{"prompt": text in the pair's format, "answer": reference text or None}`` of one input record (a
    chat pair's prompt is formatted once the tokenizer is loaded, see :func:`format_chat`)."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    answer = raw.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"'answer' must be a text, got {type(answer).__name__}")
    if domain.chat:
        text = raw.get("question", raw.get("prompt"))
        if not isinstance(text, str):
            raise ValueError(f"a {domain.name} record needs a 'question' or 'prompt' text")
        return {"prompt": None, "raw": raw, "answer": answer}
    return {"prompt": domain.prompt(raw), "answer": answer}


def format_chat(records: list[dict], tokenizer, domain: domains.Domain) -> None:
    for record in records:
        if record["prompt"] is None:
            record["prompt"] = domain.prompt(record.pop("raw"), tokenizer)


def load_records(path: str | None, domain: domains.Domain) -> list[dict]:
    """The benchmark's prompts: the pair's held-out split, or the JSONL file ``path`` (blank lines skipped).

    Raises SystemExit naming the file and line of the first malformed record."""
    if path is None:
        return [prompt_record(raw, domain) for raw in domain.held_out()]
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(prompt_record(json.loads(line), domain))
            except ValueError as error:  # json.JSONDecodeError included
                hint = "'prompt'" + (" or 'question'" if domain.accepts_question else "")
                raise SystemExit(
                    f"{path}:{number}: {error} (--pair {domain.name}: each line needs {hint}, 'answer' is optional)"
                ) from error
    if not records:
        raise SystemExit(f"{path}: no prompts in the file")
    return records


def fit_context(
    records: list[dict],
    tokenizer,
    max_new_tokens: int,
    max_positions: int | None,
    answers: bool = True,
    add_special_tokens: bool = True,
):
    """(records that fit the models' positions, how many did not): prompt + ``max_new_tokens``, and
    (with ``answers``, for the answer's perplexity) prompt + answer, must fit in ``max_positions``."""
    if max_positions is None:
        return records, 0
    kept = []
    for record in records:
        prompt = len(tokenizer(record["prompt"], add_special_tokens=add_special_tokens)["input_ids"])
        answer = (
            0
            if record["answer"] is None or not answers
            else len(tokenizer(record["answer"], add_special_tokens=False)["input_ids"])
        )
        if prompt + max(max_new_tokens, answer) <= max_positions:
            kept.append(record)
    return kept, len(records) - len(kept)


def max_positions(models: dict) -> int | None:
    """The fewest positions among the models' configs (None when none sets a limit)."""
    limits = [getattr(model.config, "max_position_embeddings", None) for model in models.values()]
    limits = [limit for limit in limits if limit]
    return min(limits) if limits else None


class ForwardCounter:
    """Counts forward calls of a model (prefill and decode alike) with a forward hook."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def close(self):
        self.handle.remove()


def answer_perplexity(model, tokenizer, records: list[dict], add_special_tokens: bool = True) -> float | None:
    """exp(mean NLL) of the reference answers' tokens, each after its prompt in the pair's format
    (the closing EOS is not counted); records without an answer are left out, None if all are."""
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    return domains.answer_perplexity(model, tokenizer, prompts, answers, add_special_tokens)


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
        elif name == "engine_auto":
            # The engine's defaults: the step shape chosen per sync from the measured costs (block_size="auto",
            # candidates="auto", init="ngram"); compiled, a small fixed set of graphs.
            self.engine = JacobiEngine(model, compile=compile)
            assert (self.engine.config.block_size, self.engine.config.candidates) == ("auto", "auto")
        self.shapes: dict = {}  # engine_auto: the shapes chosen over the timed calls
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
            for shape, used in (out.stats.shapes or {}).items():
                total = self.shapes.setdefault(shape, {"decisions": 0, "forwards": 0})
                total["decisions"] += used["decisions"]
                total["forwards"] += used["forwards"]
                # The cost the choice divided by at the end of the call, and the cost model's measurement.
                total["seconds_per_step"] = used["seconds_per_step"]
                total["measured_seconds_per_step"] = used["measured_seconds_per_step"]
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
    for method in methods.values():
        method.shapes.clear()  # count the timed calls only
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
    SHAPES_CHOSEN.update({key: dict(method.shapes) for key, method in methods.items() if method.shapes})
    return results


SHAPES_CHOSEN: dict = {}  # (method, model, compile) -> {shape: decisions, forwards} of engine_auto rows


SAMPLING_METHODS = (
    "hf_sample",
    "engine_sample_sjd",
    "engine_sample_one_hot",
    "engine_sample_sjd_ngram",
    "engine_sample_pool",
)


def run_sampling_method(
    name: str, model, tokenizer, prompts, max_new_tokens: int, block_size: int, temperature, pool=(2, 8)
):
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
    elif name == "engine_sample_pool":
        k, g = pool
        engine = JacobiEngine(model, block_size=block_size, init="ngram", candidates=k, candidate_len=g)

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


def sampling_rows(
    models, tokenizer, prompts, records, max_new_tokens: int, block_size: int, domain, pool=(2, 8)
) -> list[dict]:
    rows = []
    for temperature in (0.7, 1.0):
        for model_name in ("teacher", "cllm"):
            for method in SAMPLING_METHODS:
                outputs, seconds, calls = run_sampling_method(
                    method, models[model_name], tokenizer, prompts, max_new_tokens, block_size, temperature, pool
                )
                tokens = sum(len(o) for o in outputs)
                rows.append(
                    dict(
                        method=method,
                        model=model_name,
                        temperature=temperature,
                        tokens_per_s=tokens / seconds,
                        tokens_per_forward=tokens / calls,
                        quality=quality(outputs, tokenizer, records, domain),
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
    print(
        f"\n| T | method | model | tokens/s | tokens/forward | {domain.quality_short} (pts) | vs own HF sampling |\n|"
        + "---|" * 7
    )
    for r in rows:
        print(
            f"| {r['temperature']} | {r['method']} | {r['model']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_forward']:.2f} | {_number(r['quality'], 1)} | {r['speedup_vs_own_sampling']:.2f}x |"
        )
    return rows


def greedy_ids(model, tokenizer, input_ids, max_new_tokens: int) -> list[int]:
    sequences = model.generate(
        input_ids,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return sequences[0, input_ids.shape[1] :].tolist()


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    same = total = 0
    for ours, theirs in zip(outputs, reference):
        total += len(theirs)
        same += sum(a == b for a, b in zip(ours, theirs))
    return same / total if total else 1.0


def quality(outputs: list[list[int]], tokenizer, records: list[dict], domain: domains.Domain) -> float | None:
    """The pair's quality metric (points) of the generated ids against the records' answers."""
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
    return domain.quality(texts, [record["answer"] for record in records])


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(rows: list[dict], path: str, title: str) -> None:
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
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here (and a .png next to it)")
    parser.add_argument(
        "--pair", choices=domains.PAIRS, default="gsm8k", help="reference pair: models, prompts, format, metric"
    )
    parser.add_argument(
        "--prompts",
        help='JSONL of {"prompt"} (as is) or, for gsm8k, {"question"} lines, "answer" optional '
        "(default: the pair's held-out split)",
    )
    parser.add_argument("--teacher", help="teacher (base) model: a directory or a named model (default: the pair's)")
    parser.add_argument("--cllm", help="CLLM model: a directory or a named model (default: the pair's)")
    parser.add_argument(
        "--limit", type=int, default=None, help="prompts to generate for (0: all; default 100, 8 for smollm2)"
    )
    parser.add_argument("--block-size", type=int, default=None, help="default: the CLLM's training block size")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 256, 128 for smollm2")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (HF's and ours)")
    parser.add_argument(
        "--pool", type=int, nargs=2, default=(2, 8), metavar=("K", "G"), help="engine_pool candidates (bench_pool.py)"
    )
    parser.add_argument(
        "--sampling", choices=("on", "only", "off"), default="on", help="the sampling rows: with, only, or without"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="only these rows (hf_greedy and hf_prompt_lookup always run: the speedups need them)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights of both models; bfloat16 rows also report their agreement with float32 HF greedy",
    )
    args = parser.parse_args(argv)
    domain = domains.get_domain(args.pair)
    real = domain.chat  # the real model: a 135M forward per token on CPU
    args.limit = args.limit if args.limit is not None else (8 if real else 100)
    args.max_new_tokens = args.max_new_tokens or (128 if real else 256)
    args.teacher, args.cllm = model_dir(args.teacher, "teacher", domain), model_dir(args.cllm, "cllm", domain)
    records = load_records(args.prompts, domain)  # a malformed file fails before the models load
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    tokenizer, models = load_pair(args.teacher, args.cllm, dtype)
    format_chat(records, tokenizer, domain)
    special = not domain.chat
    block_size = args.block_size or getattr(models["cllm"].config, "jacobi_block_size", None) or 16
    records, skipped = fit_context(
        records, tokenizer, args.max_new_tokens, max_positions(models), add_special_tokens=special
    )
    if skipped:
        print(f"skipped {skipped} prompts too long for the models' positions", flush=True)
    records = records[: args.limit] if args.limit else records
    if not records:
        raise SystemExit("no prompt fits the models' positions: lower --max-new-tokens")
    prompts = [domain.encode(tokenizer, r["prompt"], return_tensors="pt") for r in records]
    perplexity = {name: answer_perplexity(model, tokenizer, records, special) for name, model in models.items()}
    fp32_greedy = None
    if dtype != torch.float32:  # the float32 greedy outputs, for the agreement of every bf16 row
        _, fp32_models = load_pair(args.teacher, args.cllm, torch.float32)
        fp32_greedy = {
            name: [greedy_ids(m, tokenizer, ids, args.max_new_tokens) for ids in prompts]
            for name, m in fp32_models.items()
        }
        del fp32_models
    sampled = []
    if args.sampling != "off":
        sampled = sampling_rows(
            models, tokenizer, prompts, records, args.max_new_tokens, block_size, domain, tuple(args.pool)
        )
    if args.sampling == "only":
        return write_result(args, domain, records, skipped, block_size, dict(sampling_rows=sampled))

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
        ("engine_auto", "teacher", False),
        ("engine_auto", "teacher", True),
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
        ("engine_auto", "cllm", False),
        ("engine_auto", "cllm", True),
    ]
    if args.methods:
        plan = [entry for entry in plan if entry[0] in (*args.methods, "hf_greedy", "hf_prompt_lookup")]
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
                quality=quality(outputs, tokenizer, records, domain),
                perplexity=perplexity[model_name],
                agreement=agreement(outputs, greedy[model_name]),
                agreement_fp32=None if fp32_greedy is None else agreement(outputs, fp32_greedy[model_name]),
                tokens=tokens,
                seconds=seconds,
                forwards=calls,
                shapes_chosen=SHAPES_CHOSEN.get((method, model_name, compiled)),
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

    table = markdown_table(rows, domain, bf16=fp32_greedy is not None)
    print("\n" + table)
    print(f"\nCLLM greedy output vs teacher greedy output: {cllm_teacher_agreement:.3f} of tokens agree")
    png = str(Path(args.json).with_suffix(".png"))
    plot([r for r in rows if not (r["method"] == "hf_greedy" and r["model"] == "cllm")], png, plot_title(args, domain))
    extra = dict(cllm_teacher_agreement=cllm_teacher_agreement, rows=rows, sampling_rows=sampled)
    code = write_result(args, domain, records, skipped, block_size, extra)
    md = Path(args.json).with_suffix(".md")
    md.write_text(f"`{json.loads(Path(args.json).read_text())['command']}`\n\n{table}\n")
    print(f"wrote {md}")
    return code


def markdown_table(rows: list[dict], domain: domains.Domain, bf16: bool) -> str:
    """The greedy rows as a Markdown table (bf16 runs: agreement with bf16 and with fp32 HF greedy)."""
    header = (
        f"| method | model | compile | tokens/s | tokens/forward | {domain.quality_short} (pts) | perplexity | "
        + ("agreement (bf16 HF greedy) | agreement (fp32 HF greedy) | " if bf16 else "agreement | ")
        + "vs own HF greedy | vs own HF static+compile | vs own prompt lookup | vs teacher HF greedy |"
    )
    lines = [header, "|" + "---|" * (13 if bf16 else 12)]
    for r in rows:
        static = r.get("speedup_vs_own_hf_static_compile")
        agree = f"{r['agreement']:.3f} | " + (f"{r['agreement_fp32']:.3f} | " if bf16 else "")
        lines.append(
            f"| {r['method']} | {r['model']} | {'yes' if r['compile'] else 'no'} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_forward']:.2f} | {_number(r['quality'], 1)} | {_number(r['perplexity'], 3)} | "
            f"{agree}"
            f"{r['speedup_vs_own_greedy']:.2f}x | {'-' if static is None else f'{static:.2f}x'} | "
            f"{r['speedup_vs_own_prompt_lookup']:.2f}x | {r['speedup_vs_teacher_greedy']:.2f}x |"
        )
    return "\n".join(lines)


def model_dir(given: str | None, name: str, domain: domains.Domain) -> str:
    """--teacher / --cllm: the directory (or named model) given, else the pair's (which must be installed)."""
    from jacobi_engine import models

    if given is not None and models.is_named(given):
        return models.resolve(given)
    if given is None:
        if not domain.pair_available():
            raise SystemExit(domain.missing_pair_message())
        return domain.model_path(name)
    if not Path(given, "config.json").exists():
        raise SystemExit(f"--{name} {given}: no config.json there (a local Hugging Face model directory is needed)")
    return given


def source_of(args, domain: domains.Domain) -> str:
    if args.prompts:
        return args.prompts
    return f"jacobi_engine/assets/{domain.name}/eval.jsonl.gz (held out)"


def plot_title(args, domain: domains.Domain) -> str:
    prompts = f"{domain.title} prompts of {Path(args.prompts).name}" if args.prompts else f"Held-out {domain.title}"
    return f"{prompts}: greedy, prompt lookup and Jacobi decoding"


def write_result(args, domain: domains.Domain, records, skipped: int, block_size: int, extra: dict) -> int:
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
        pair=domain.name,
        questions=len(records),
        answers=sum(r["answer"] is not None for r in records),
        skipped_too_long=skipped,
        source=source_of(args, domain),
        quality_metric=domain.quality_name,
        block_size=block_size,
        pool=dict(candidates=args.pool[0], candidate_len=args.pool[1]),
        dtype=args.dtype,
        models=dict(teacher=args.teacher, cllm=args.cllm),
        max_new_tokens=args.max_new_tokens,
        **extra,
    )
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
