"""The reference Python-code pair shipped in the package (jacobi_engine/assets/cllm-code).

Runs the real shipped models on held-out standard-library prompts (whole modules never trained on),
so a wrong or damaged model there fails here. Skipped only where the pair is not installed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from jacobi_engine import JacobiEngine, cli, domains

CODE = domains.get_domain("code")
pytestmark = pytest.mark.skipif(not CODE.pair_available(), reason="the code pair is not installed")


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CODE.assets / "teacher", local_files_only=True)
    models = {
        name: AutoModelForCausalLM.from_pretrained(CODE.assets / name, local_files_only=True, dtype=torch.float32)
        for name in ("teacher", "cllm")
    }
    return tokenizer, {name: model.eval() for name, model in models.items()}


def test_shipped_files_are_small_safetensors_llamas():
    for name in ("teacher", "cllm"):
        weights = CODE.assets / name / "model.safetensors"
        assert weights.stat().st_size <= 10 * 1000 * 1000
        assert not list((CODE.assets / name).glob("*.bin")), "ship safetensors only"
        config = json.loads((CODE.assets / name / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert json.loads((CODE.assets / name / "provenance.json").read_text())["command"].startswith("python ")
    assert json.loads((CODE.assets / "cllm" / "config.json").read_text())["jacobi_block_size"] == 16


def test_demo_prompts_are_held_out_modules():
    held_out = {(r["prompt"], r["answer"]) for r in CODE.held_out()}
    split = json.loads((CODE.held_out_path.parent / "split.json").read_text())
    demo = CODE.demo_records()
    assert demo and all((r["prompt"], r["answer"]) in held_out for r in demo)
    modules = {r["module"].split(".")[0] for r in CODE.held_out()}
    assert modules <= set(split["eval_top_levels"])


@torch.inference_mode()
def test_cllm_accepts_more_tokens_and_keeps_perplexity(pair):
    tokenizer, models = pair
    records = CODE.held_out()[:20]
    prompts = [CODE.prompt(r) for r in records]
    perplexity = {}
    for name, model in models.items():  # computed here, not by the package's helper
        nll = count = 0.0
        for prompt, record in zip(prompts, records):
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([prompt_ids + answer])).logits[0, len(prompt_ids) - 1 : -1]
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum"))
            count += len(answer)
        perplexity[name] = math.exp(nll / count)
    assert perplexity["cllm"] <= 1.10 * perplexity["teacher"], perplexity
    per_forward = {}
    for name, model in models.items():
        engine = JacobiEngine(model, block_size=16, seed=7)
        tokens = forwards = 0
        for prompt in prompts[:4]:
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = engine.generate(input_ids, max_new_tokens=96)
            expected = model.generate(input_ids, do_sample=False, max_new_tokens=96)
            assert torch.equal(out.sequences, expected), name
            tokens += out.stats.tokens_generated
            forwards += out.stats.forward_passes
        per_forward[name] = tokens / forwards
    assert per_forward["cllm"] >= 1.2 * per_forward["teacher"], per_forward


def test_demo_runs_the_code_pair(capsys):
    assert cli.main(["demo", "--pair", "code", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "shipped Python code pair" in out
    assert CODE.demo_records()[0]["prompt"] in out
    assert "output identical: True" in out
