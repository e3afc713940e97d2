"""The reference GSM8K pair shipped in the package, `jacobi-engine demo` and the generation benchmark.

These run the real shipped models (4.2M parameters each, the v2 pair) on a few held-out questions, so a wrong
or damaged model in jacobi_engine/assets fails here, not only in the benchmark.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from models import tiny_model

from jacobi_engine import JacobiEngine, cli, demo, domains
from jacobi_engine import models as named_models
from jacobi_engine.gsm8k import format_prompt, load_jsonl_gz, repo_data_path

REPO = Path(__file__).resolve().parents[1]
ASSETS = demo.ASSETS

pytestmark = pytest.mark.skipif(not demo.shipped_pair_available(), reason="the shipped pair is not installed")


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "teacher", local_files_only=True)
    models = {
        name: AutoModelForCausalLM.from_pretrained(ASSETS / name, local_files_only=True, dtype=torch.float32).eval()
        for name in ("teacher", "cllm")
    }
    return tokenizer, models


def test_shipped_files_are_small_safetensors_llamas():
    for name in ("teacher", "cllm"):
        weights = ASSETS / name / "model.safetensors"
        assert weights.stat().st_size <= 10 * 1000 * 1000
        assert not list((ASSETS / name).glob("*.bin")), "ship safetensors only"
        config = json.loads((ASSETS / name / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert json.loads((ASSETS / name / "provenance.json").read_text())["command"].startswith("python ")
    assert json.loads((ASSETS / "cllm" / "config.json").read_text())["jacobi_block_size"] == 16


def test_demo_questions_are_held_out():
    train = {record["question"] for record in load_jsonl_gz(repo_data_path("train"))}
    held_out = {record["question"] for record in load_jsonl_gz(repo_data_path("eval"))}
    with open(ASSETS / "demo_questions.jsonl") as handle:
        questions = [json.loads(line)["question"] for line in handle]
    assert questions
    assert all(q in held_out and q not in train for q in questions)


@torch.inference_mode()
def test_cllm_accepts_more_tokens_and_keeps_perplexity(pair):
    tokenizer, models = pair
    records = load_jsonl_gz(repo_data_path("eval"))[:20]
    # Perplexity of the reference answers: the CLLM must stay within +10% of the teacher.
    perplexity = {}
    for name, model in models.items():
        nll = count = 0.0
        for record in records:
            prompt = tokenizer(format_prompt(record["question"]))["input_ids"]
            answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
            count += len(answer)
        perplexity[name] = math.exp(nll / count)
    assert perplexity["cllm"] <= 1.10 * perplexity["teacher"], perplexity

    # Tokens per forward with random initial guesses, and exactness against HF greedy on both models.
    per_forward = {}
    for name, model in models.items():
        engine = JacobiEngine(model, block_size=16, seed=7)
        tokens = forwards = 0
        for record in records[:4]:
            input_ids = tokenizer(format_prompt(record["question"]), return_tensors="pt").input_ids
            out = engine.generate(input_ids, max_new_tokens=96)
            expected = model.generate(input_ids, do_sample=False, max_new_tokens=96)
            assert torch.equal(out.sequences, expected), name
            tokens += out.stats.tokens_generated
            forwards += out.stats.forward_passes
        per_forward[name] = tokens / forwards
    assert per_forward["cllm"] >= 1.2 * per_forward["teacher"], per_forward  # a regression guard, not the target


def test_demo_runs_the_shipped_pair(capsys):
    assert torch.is_grad_enabled()
    assert cli.main(["demo", "--pair", "gsm8k", "--max-new-tokens", "24"]) == 0
    assert torch.is_grad_enabled(), "the demo must not switch autograd off for its caller"
    out = capsys.readouterr().out
    assert "shipped GSM8K pair" in out
    with open(ASSETS / "demo_questions.jsonl") as handle:
        assert json.loads(handle.readline())["question"] in out
    assert "Jacobi on the CLLM" in out and "AR on the CLLM (HF greedy)" in out and "AR on the teacher" in out
    # The lossless figure (same model, identical output) comes first, the cross-model one after it.
    assert out.index("lossless speedup") < out.index("CLLM (Jacobi) vs teacher")
    assert "output identical: True" in out
    assert "</s>" not in out  # special tokens are not streamed


def test_demo_on_a_local_model_with_a_prompt(tmp_path, capsys):
    from jacobi_engine.training import toy

    tokenizer = toy.train_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code = cli.main(["demo", "--model", str(tmp_path / "model"), "--prompt", "def main():", "--max-new-tokens", "20"])
    assert code == 0
    out = capsys.readouterr().out
    assert "def main():" in out
    assert "output identical: True" in out


def test_demo_without_a_shipped_pair_says_the_model_is_random(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(domains, "ASSETS_ROOT", tmp_path / "nothing-here")
    monkeypatch.setattr(named_models, "ASSETS", tmp_path / "nothing-here")  # and no SmolLM2 CLLM adapter
    assert cli.main(["demo", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in out
    assert "output identical: True" in out


def test_demo_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        cli.main(["demo", "--model", str(tmp_path), "--prompt", "x"])


def _bench_generate():
    path = REPO / "python" / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_rows_on_a_prompts_file(tmp_path):
    bench = _bench_generate()
    prompts = tmp_path / "prompts.jsonl"
    records = load_jsonl_gz(repo_data_path("eval"))[100:102]
    prompts.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records))
    out = tmp_path / "result.json"
    threads = torch.get_num_threads()
    try:
        # Compiled rows are left out here (seven inductor compiles); tests/test_compile.py covers compile=True.
        code = bench.main(
            ["--json", str(out), "--prompts", str(prompts), "--max-new-tokens", "24", "--threads", "1", "--no-compile"]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["questions"] == 2 and result["source"] == str(prompts)
    table = out.with_suffix(".md").read_text().splitlines()  # the table written beside the JSON
    assert table[0] == f"`{result['command']}`" and len([line for line in table if line.startswith("| ")]) == 1 + len(
        result["rows"]
    )
    found = {(row["method"], row["model"]) for row in result["rows"]}
    assert {
        ("hf_greedy", "teacher"),
        ("hf_prompt_lookup", "teacher"),
        ("engine_ar", "teacher"),
        ("engine_jacobi", "teacher"),
        ("engine_jacobi", "cllm"),
        ("engine_jacobi_ngram", "cllm"),
    } <= found
    for row in result["rows"]:
        assert set(row) >= {"tokens_per_s", "tokens_per_forward", "quality", "perplexity", "agreement", "compile"}
        assert row["compile"] is False
        assert row["tokens_per_s"] > 0 and row["tokens_per_forward"] >= 1.0 - 1e-9
        assert 0 <= row["quality"] <= 100 and row["perplexity"] > 1
        if row["method"].startswith("engine"):
            assert row["agreement"] == 1.0, row  # greedy decoding is exact
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    sampled = {(row["method"], row["model"], row["temperature"]) for row in result["sampling_rows"]}
    assert sampled == {
        (method, model, temperature)
        for method in bench.SAMPLING_METHODS
        for model in ("teacher", "cllm")
        for temperature in (0.7, 1.0)
    }
    for row in result["sampling_rows"]:
        assert row["tokens_per_s"] > 0 and row["tokens_per_forward"] >= 1.0 - 1e-9 and 0 <= row["quality"] <= 100


def test_bench_generate_rejects_a_malformed_prompts_file(tmp_path):
    bench = _bench_generate()
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(json.dumps({"answer": "an answer to no question"}) + "\n")  # ("answer" is optional)
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        bench.main(["--json", str(tmp_path / "x.json"), "--prompts", str(prompts)])
