"""Beyond one process, on CPU with gloo (``torchrun --nproc_per_node 2``):

* tensor-parallel Jacobi decoding (``from_pretrained(tp_plan="auto")``) of Llama with GQA and
  Qwen2, ragged batches, both modes: every rank's output equals single-process HF greedy;
* sharded collection: one rank killed mid-run, then the same command again: the merged dataset
  equals a single-process collection, and no batch was decoded twice;
* sharded training (FSDP2 and DDP): a run killed at step 3 and resumed from its step-2 checkpoint
  logs the losses of single-process training with the same per-step samples, and ends with its
  weights.

Each check launches tests/distributed_worker.py; expectations come from this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from distributed_worker import TP_CASES, TP_NEW_TOKENS, tp_prompts
from greedy_check import assert_matches_greedy, hf_greedy
from models import tiny_model

from jacobi_engine.training import toy
from jacobi_engine.training.collect import collect_trajectories
from jacobi_engine.training.recipe import train_consistency

TESTS = Path(__file__).parent
WORKER = TESTS / "distributed_worker.py"


def torchrun(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(WORKER), *args]
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
    # The worker imports the package and the tests' helpers the way pytest does.
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), environment.get("PYTHONPATH", "")])
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, cwd=TESTS)
    if check:
        assert result.returncode == 0, result.stderr[-6000:]
    return result


def ranks(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


# -- tensor parallelism ----------------------------------------------------------------------------
def test_tensor_parallel_decoding_equals_single_process_greedy(tmp_path):
    model_dirs = {}
    for arch in ("llama", "qwen2"):  # both GQA: 4 query heads, 2 KV heads (Qwen2 adds qkv bias)
        tiny_model(arch, vocab_size=96).save_pretrained(tmp_path / arch)
        model_dirs[arch] = str(tmp_path / arch)
    torchrun("tp", str(tmp_path / "out"), *model_dirs.values())
    records = ranks(tmp_path / "out")

    for arch, model_dir in model_dirs.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()  # one process, unsharded
        input_ids, mask = tp_prompts(model.config.vocab_size)
        expected = hf_greedy(model, input_ids, mask, TP_NEW_TOKENS, eos_token_id=[], pad_token_id=0)
        rank0, rank1 = records[0][model_dir], records[1][model_dir]
        assert rank0["world_size"] == 2
        # Really sharded: each rank holds half of the query heads and one of the two KV heads.
        assert rank0["q_proj_local_rows"] == rank1["q_proj_local_rows"] == model.config.hidden_size // 2
        for case, out0, out1 in zip(TP_CASES, rank0["cases"], rank1["cases"]):
            assert out0["cache_kv_heads"] == out1["cache_kv_heads"] == model.config.num_key_value_heads // 2
            assert out0["sequences"] == out1["sequences"], f"{arch} {case}: ranks disagree"
            ties = assert_matches_greedy(
                model, torch.tensor(out0["sequences"]), expected, input_ids, mask, pad_token_id=0
            )
            assert ties == 0, f"{arch} {case}: {ties} near-tie divergences"
            assert out0["forwards"] == out1["forwards"]
            assert out0["block_size"] == case.get("block_size", 16)  # the defaults: a fixed block under TP
        for record in (rank0, rank1):
            assert "block_size='auto' is not supported under tensor parallelism" in record["auto_refused"]


# -- collection ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_setup(tmp_path_factory):
    """A saved tiny Llama + tokenizer, a prompts file, and a small trajectory dataset."""
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = toy.train_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = [{"prompt": text, "answer": "return None"} for text in toy.stdlib_prompts(8, max_chars=40)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in prompts))
    collect_trajectories(
        model, tokenizer, prompts, root / "data", block_size=4, max_new_tokens=12, eos_token_id=[], progress=False
    )
    return {"root": root, "model": root / "model", "prompts": prompts, "data": root / "data", "tokenizer": tokenizer}


def test_sharded_collection_killed_and_resumed_equals_single_process(trained_setup, tmp_path):
    out = tmp_path / "data"
    argv = [
        "collect",
        "--model",
        str(trained_setup["model"]),
        "--prompts",
        str(trained_setup["root"] / "prompts.jsonl"),
    ]
    argv += ["--out", str(out), "--block-size", "4", "--max-new-tokens", "10", "--batch-size", "2", "--no-progress"]
    num_batches = 4  # 8 prompts, 2 per batch: rank 0 owns batches 0 and 2, rank 1 owns 1 and 3

    # Rank 1 dies after decoding its second batch, before writing it; torchrun then stops rank 0
    # wherever it is.
    killed = torchrun(
        "cli", str(tmp_path / "first"), "--", *argv, env={"JE_TEST_DIE_AT": "2", "JE_TEST_DIE_RANK": "1"}, check=False
    )
    assert killed.returncode != 0
    first = ranks(tmp_path / "first")
    assert first[1]["batches"] == [1, 3]
    listed = set()
    for rank in (0, 1):
        manifest = json.loads((out / f"manifest-rank-{rank:05d}.json").read_text())
        batches = {int(key) for key in manifest["batches"]}
        assert all(batch % 2 == rank for batch in batches)
        listed |= batches
    assert 1 in listed and 3 not in listed
    assert not (out / "dataset_info.json").exists()

    torchrun("cli", str(tmp_path / "second"), "--", *argv)
    second = ranks(tmp_path / "second")
    redone = second[0]["batches"] + second[1]["batches"]
    assert not set(redone) & listed, "a batch recorded before the kill was decoded again"
    assert sorted(redone + sorted(listed)) == list(range(num_batches))
    assert all(batch % 2 == 0 for batch in second[0]["batches"]) and all(b % 2 for b in second[1]["batches"])
    assert not list(out.glob("manifest-rank-*.json"))  # folded into manifest.json
    assert sorted(json.loads((out / "manifest.json").read_text())["batches"]) == ["0", "1", "2", "3"]

    from datasets import load_from_disk

    model = transformers.AutoModelForCausalLM.from_pretrained(str(trained_setup["model"]))
    reference = collect_trajectories(
        model, trained_setup["tokenizer"], trained_setup["prompts"], tmp_path / "single", block_size=4,
        max_new_tokens=10, batch_size=2, progress=False,
    )  # fmt: skip
    merged = load_from_disk(str(out))
    assert len(merged) == len(reference) > 0
    assert merged.to_list() == reference.to_list()


# -- training ------------------------------------------------------------------------------------------
TRAIN_OPTIONS = dict(max_steps=4, save_steps=2, logging_steps=1, learning_rate=1e-3, batch_size=2)


def _losses(state: dict) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_sharded_training_killed_and_resumed_matches_single_process(trained_setup, tmp_path, strategy):
    # Two processes x 2 samples per step see the same samples as one process x 2 samples x 2
    # accumulation steps (accelerate hands batch i to rank i % 2), and both average the two halves'
    # gradients, so the runs agree up to the order of floating-point sums.
    reference = train_consistency(
        trained_setup["model"], trained_setup["data"], tmp_path / "single", grad_accum=2, **TRAIN_OPTIONS
    )
    expected = _losses({"log_history": reference.state.log_history})
    assert sorted(expected) == [1, 2, 3, 4]

    out = tmp_path / "out"
    argv = ["train", "--model", str(trained_setup["model"]), "--data", str(trained_setup["data"]), "--out", str(out)]
    argv += ["--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "1e-3"]
    argv += ["--batch-size", "2"] + (["--fsdp"] if strategy == "fsdp" else [])
    killed = torchrun("cli", str(tmp_path / "first"), "--", *argv, env={"JE_TEST_DIE_AT": "3"}, check=False)
    assert killed.returncode != 0
    assert ranks(tmp_path / "first")[0]["steps"] == [1, 2, 3]
    assert (out / "checkpoint-2").is_dir() and not (out / "model.safetensors").exists()
    if strategy == "fsdp":  # accelerate's FSDP checkpoint: the model and each rank's optimizer shard
        assert list((out / "checkpoint-2").glob("pytorch_model_fsdp*"))

    torchrun("cli", str(tmp_path / "second"), "--", *argv, "--resume")
    second = ranks(tmp_path / "second")
    for record in second:
        assert record["steps"] == [3, 4]  # continued from checkpoint-2, did not start over
        assert record["fsdp"] is (strategy == "fsdp")
        assert record["model_class"] == ("FSDPLlamaForCausalLM" if strategy == "fsdp" else "DistributedDataParallel")
    losses = _losses(json.loads((out / "checkpoint-4" / "trainer_state.json").read_text()))
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    single, sharded = _weights(tmp_path / "single"), _weights(out)
    assert set(single) == set(sharded)
    for name in single:
        assert torch.allclose(single[name], sharded[name], atol=1e-5), name
