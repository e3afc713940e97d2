"""On-policy rounds: round r collects with round r-1's CLLM, and a killed run resumes to the
weights of an uninterrupted one."""

import json

import pytest
import torch
import transformers
from models import tiny_model

from jacobi_engine.training import toy
from jacobi_engine.training.rounds import round_dir, run_rounds
from jacobi_engine.training.shards import read_manifest


class _StepsRun(transformers.TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((args.output_dir.split("/")[-2], state.global_step))


class _Killed(Exception):
    pass


class _KillAtStep(transformers.TrainerCallback):
    """Kills round 1's training at ``step`` (after its checkpoint-2)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if "round-1" in args.output_dir and state.global_step == self.step:
            raise _Killed


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    tokenizer = toy.train_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return root / "teacher"


def _run(teacher, out, callbacks=None):
    prompts = toy.stdlib_prompts(8, max_chars=40)
    options = dict(max_steps=4, save_steps=2, batch_size=2, learning_rate=3e-3, logging_steps=1, callbacks=callbacks)
    return run_rounds(
        teacher, out, 2, lambda r: prompts[4 * r : 4 * r + 4], block_size=4, max_new_tokens=8, eos_token_id=[],
        collect_batch_size=4, train_options=options, log=lambda message: None,
    )  # fmt: skip


def test_rounds_collect_with_the_previous_cllm_and_resume(teacher, tmp_path):
    straight = _run(teacher, tmp_path / "straight")
    assert straight == round_dir(tmp_path / "straight", 1) / "cllm"
    with pytest.raises(_Killed):
        _run(teacher, tmp_path / "killed", callbacks=[_KillAtStep(3)])
    assert (round_dir(tmp_path / "killed", 0) / "done.json").exists()
    assert not (round_dir(tmp_path / "killed", 1) / "done.json").exists()
    assert (round_dir(tmp_path / "killed", 1) / "cllm" / "checkpoint-2").is_dir()
    round_0_weights = (round_dir(tmp_path / "killed", 0) / "cllm" / "model.safetensors").stat().st_mtime_ns
    steps_run = _StepsRun()
    _run(teacher, tmp_path / "killed", callbacks=[steps_run])  # again: round 0 skipped, round 1 resumed
    assert steps_run.steps == [("round-1", 3), ("round-1", 4)]
    assert (round_dir(tmp_path / "killed", 0) / "cllm" / "model.safetensors").stat().st_mtime_ns == round_0_weights
    for out in ("straight", "killed"):
        first, second = (round_dir(tmp_path / out, r) for r in (0, 1))
        assert read_manifest(first / "data")["config"]["model"] == str(teacher)
        assert read_manifest(second / "data")["config"]["model"] == str(first / "cllm")
        assert json.loads((second / "done.json").read_text())["steps"] == 4
    a = transformers.AutoModelForCausalLM.from_pretrained(str(straight)).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "killed" / "round-1" / "cllm")).state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_bad_arguments(teacher, tmp_path):
    with pytest.raises(ValueError, match="rounds"):
        run_rounds(teacher, tmp_path, 0, [], block_size=4, max_new_tokens=4)
    with pytest.raises(ValueError, match="resume"):
        run_rounds(teacher, tmp_path, 1, [], block_size=4, max_new_tokens=4, train_options={"resume": True})
