"""The reference pairs' domains (jacobi_engine.domains), `jacobi-engine demo --pair` and the
benchmark's prompt loading, on tiny random pairs written to a temporary assets directory."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from models import tiny_model

from jacobi_engine import cli, domains
from jacobi_engine import models as named_models
from jacobi_engine.gsm8k import load_jsonl_gz

REPO = Path(__file__).resolve().parents[1]
CODE_PROMPT = 'def add(a, b):\n    """Return the sum of a and b."""\n'
CODE_BODY = "    return a + b\n"


def _bench_generate():
    path = REPO / "python" / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate_for_pairs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the domains ----------------------------------------------------------------------------------
def test_code_prompts_are_used_as_is():
    code = domains.get_domain("code")
    assert code.prompt({"prompt": CODE_PROMPT, "answer": CODE_BODY}) == CODE_PROMPT
    record = code.held_out()[0]
    assert code.prompt(record) == record["prompt"]
    assert record["prompt"].startswith("def ")
    with pytest.raises(ValueError, match="a 'prompt' text"):
        code.prompt({"question": "What is 2 + 2?"})  # GSM8K questions are no code prompt


def test_gsm8k_prompts_format_questions_and_keep_prompts():
    gsm8k = domains.get_domain("gsm8k")
    assert gsm8k.prompt({"question": "What is 2+2?", "answer": "#### 4"}) == "Question:\nWhat is 2+2?\nAnswer:\n"
    assert gsm8k.prompt({"prompt": "Q: 2+2?\nA:"}) == "Q: 2+2?\nA:"
    with pytest.raises(ValueError, match="'question'"):
        gsm8k.prompt({"answer": "#### 4"})
    with pytest.raises(ValueError, match="pair must be one of"):
        domains.get_domain("chess")


def test_quality_metrics():
    code = domains.get_domain("code")
    generated = [CODE_BODY + "\n\n", "  return a + b\n", "anything"]
    # The first matches (trailing whitespace aside), the second is indented differently, the third has no answer.
    assert code.quality(generated, [CODE_BODY, CODE_BODY, None]) == pytest.approx(50.0)
    assert code.quality(["x"], [None]) is None
    gsm8k = domains.get_domain("gsm8k")
    answers = ["3 + 4 = 7\n#### 7", "#### 1,000", "#### 5"]
    assert gsm8k.quality(["so #### 7", "#### 1000.", "#### 6"], answers) == pytest.approx(200 / 3)


def test_held_out_code_split_ships_in_the_package():
    code = domains.get_domain("code")
    assert code.held_out_path == REPO / "jacobi_engine" / "assets" / "code" / "eval.jsonl.gz"
    shipped_split = json.loads((code.held_out_path.parent / "split.json").read_text())
    records = code.held_out()
    assert len(records) == shipped_split["examples"]["eval"]
    assert all(isinstance(r["prompt"], str) and isinstance(r["answer"], str) for r in records)
    held_out_modules = set(shipped_split["eval_top_levels"])
    assert {r["module"].split(".")[0] for r in records} <= held_out_modules
    checkout = REPO / "data" / "code"
    if checkout.is_dir():  # the package's copy is the checkout's split, byte for byte
        assert code.held_out_path.read_bytes() == (checkout / "eval.jsonl.gz").read_bytes()
        assert (code.held_out_path.parent / "split.json").read_bytes() == (checkout / "split.json").read_bytes()
        train_modules = {r["module"].split(".")[0] for r in load_jsonl_gz(checkout / "train.jsonl.gz")}
        assert not train_modules & held_out_modules


# -- tiny pairs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from jacobi_engine.training import toy

    return toy.train_tokenizer(128)


def _write_pair(root: Path, pair: str, tokenizer, demo_records: list[dict]) -> Path:
    directory = root / f"cllm-{pair}"
    for name, seed in (("teacher", 1), ("cllm", 0)):
        model = tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
    demo_file = domains.get_domain(pair).demo_file
    (directory / demo_file).write_text("".join(json.dumps(record) + "\n" for record in demo_records))
    return directory


@pytest.fixture
def code_pair(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(domains, "ASSETS_ROOT", tmp_path)
    return _write_pair(tmp_path, "code", tokenizer, [{"prompt": CODE_PROMPT, "answer": CODE_BODY}])


def _hf_greedy_text(directory: Path, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32).eval()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        sequences = model.generate(
            input_ids,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = sequences[0, input_ids.shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_demo_runs_the_code_pair_and_matches_hf_greedy(code_pair, capsys):
    assert cli.main(["demo", "--pair", "code", "--max-new-tokens", "16", "--block-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "shipped Python code pair" in out
    assert CODE_PROMPT in out and "Question:" not in out  # the code prompt, as is
    assert "AR on the teacher" in out
    expected, generated = _hf_greedy_text(code_pair / "cllm", CODE_PROMPT, 16)
    assert generated >= 8 and expected.strip(), "the tiny CLLM stopped at once: the check below would be empty"
    assert expected in out  # the streamed Jacobi text is the CLLM's HF greedy text


@pytest.mark.parametrize("pair", ["code", "gsm8k"])
def test_demo_names_a_missing_pair_and_how_to_ship_it(tmp_path, monkeypatch, capsys, pair):
    monkeypatch.setattr(domains, "ASSETS_ROOT", tmp_path)
    with pytest.raises(SystemExit) as caught:
        cli.main(["demo", "--pair", pair, "--max-new-tokens", "4"])
    message = str(caught.value)
    assert f"--pair {pair}" in message and "not installed" in message
    assert f"python/examples/ship_reference_pair.py --pair {pair}" in message
    assert "RANDOMLY" not in capsys.readouterr().out  # an explicit --pair never falls back to a random model


def test_demo_without_a_pair_falls_back_to_a_random_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(domains, "ASSETS_ROOT", tmp_path)
    monkeypatch.setattr(named_models, "ASSETS", tmp_path)  # and no SmolLM2 CLLM adapter
    assert cli.main(["demo", "--max-new-tokens", "6"]) == 0
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out


def test_demo_rejects_model_with_pair(tmp_path):
    with pytest.raises(SystemExit, match="--model and --pair"):
        cli.main(["demo", "--model", str(tmp_path), "--pair", "code"])


# -- the benchmark's prompts ------------------------------------------------------------------------
def test_bench_loader_accepts_prompt_lines(tmp_path):
    bench = _bench_generate()
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": CODE_PROMPT}, {"prompt": "def f():\n", "answer": "    pass\n"}]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")  # a blank line is skipped
    for pair in ("code", "gsm8k"):
        records = bench.load_records(str(path), domains.get_domain(pair))
        assert records == [{"prompt": CODE_PROMPT, "answer": None}, {"prompt": "def f():\n", "answer": "    pass\n"}]
    path.write_text(json.dumps({"question": "What is 2+2?", "answer": "#### 4"}) + "\n")
    records = bench.load_records(str(path), domains.get_domain("gsm8k"))
    assert records == [{"prompt": "Question:\nWhat is 2+2?\nAnswer:\n", "answer": "#### 4"}]


@pytest.mark.parametrize(
    "pair, line",
    [
        ("gsm8k", '{"answer": "#### 4"}'),  # neither a prompt nor a question
        ("code", '{"question": "What is 2+2?"}'),  # questions are GSM8K's
        ("code", "def f(): not json"),
        ("gsm8k", '["a list"]'),
        ("code", '{"prompt": "def f():\\n", "answer": 3}'),
    ],
)
def test_bench_loader_names_the_malformed_line(tmp_path, pair, line):
    bench = _bench_generate()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": CODE_PROMPT}) + "\n" + line + "\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: "):
        bench.load_records(str(path), domains.get_domain(pair))


def test_bench_perplexity_uses_the_prompt_as_is(tokenizer):
    bench = _bench_generate()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    records = bench.load_records(None, domains.get_domain("code"))[:2]
    nll = count = 0.0
    with torch.no_grad():
        for record in records:
            prompt = tokenizer(record["prompt"])["input_ids"]
            answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([prompt + answer])).logits[0]
            for position, target in enumerate(answer):
                nll -= float(torch.log_softmax(logits[len(prompt) - 1 + position], -1)[target])
            count += len(answer)
    assert bench.answer_perplexity(model, tokenizer, records) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert bench.answer_perplexity(model, tokenizer, [dict(records[0], answer=None)]) is None


def test_bench_skips_prompts_too_long_for_the_models(tokenizer):
    bench = _bench_generate()
    short, long = {"prompt": "def f():", "answer": None}, {"prompt": "def f(): return 1\n" * 40, "answer": None}
    assert len(tokenizer(long["prompt"])["input_ids"]) > 64
    kept, skipped = bench.fit_context([short, long], tokenizer, max_new_tokens=16, max_positions=64)
    assert kept == [short] and skipped == 1
    long_answer = dict(short, answer="x = 1\n" * 40)
    assert bench.fit_context([long_answer], tokenizer, 16, 64) == ([], 1)
    assert bench.fit_context([long_answer], tokenizer, 16, 64, answers=False) == ([long_answer], 0)


def test_bench_runs_the_code_pair_on_prompts_without_answers(code_pair, tmp_path):
    bench = _bench_generate()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": CODE_PROMPT}) + "\n" + json.dumps({"prompt": "def g(x):\n"}) + "\n")
    out = tmp_path / "result.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--json", str(out), "--pair", "code", "--prompts", str(prompts), "--max-new-tokens", "8"]
        code = bench.main(argv + ["--threads", "1", "--no-compile", "--sampling", "off", "--block-size", "4"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["pair"] == "code" and result["source"] == str(prompts)
    assert result["questions"] == 2 and result["answers"] == 0
    assert "exact match" in result["quality_metric"]
    assert result["rows"]
    for row in result["rows"]:
        assert row["quality"] is None and row["perplexity"] is None  # no reference answers given
        if row["method"].startswith("engine"):
            assert row["agreement"] == 1.0, row  # greedy decoding is exact
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
