"""Checkpoints whole or absent, and output folders that training never overwrites by accident.

* a training process SIGKILLed halfway through writing a checkpoint resumes from the checkpoint
  before it and ends with the weights of an uninterrupted run; the cut checkpoint is never used;
* checkpoints hold every file of a resume, rotate by ``save_total_limit`` and are what
  transformers' ``get_last_checkpoint`` finds; leftovers of interrupted saves are removed;
* a non-empty ``--out`` needs ``--resume`` or ``--overwrite``; ``--out`` and the model folder may
  not be the same or nested; nothing is written when a run is refused.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from models import tiny_model
from transformers.trainer_utils import get_last_checkpoint

from jacobi_engine import cli
from jacobi_engine.training import toy
from jacobi_engine.training.collect import collect_trajectories
from jacobi_engine.training.recipe import train_consistency

TESTS = Path(__file__).parent
WORKER = TESTS / "checkpoint_worker.py"
OPTIONS = dict(max_steps=6, save_steps=2, logging_steps=1, learning_rate=1e-3, batch_size=4)
# Every file transformers needs to resume a single-process run.
RESUME_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model + tokenizer and 8 prompts' trajectories (3 chunks each)."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = toy.train_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = toy.stdlib_prompts(8, max_chars=40)
    collect_trajectories(
        model, tokenizer, prompts, root / "data", block_size=4, max_new_tokens=12, eos_token_id=[], progress=False
    )
    return {"model": root / "model", "data": root / "data"}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> sha256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class _StepRecorder(transformers.TrainerCallback):
    def __init__(self, stop_at: int | None = None):
        self.steps = []
        self.stop_at = stop_at

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.stop_at:
            raise KeyboardInterrupt  # a kill between checkpoints


def _checkpoints(out: Path) -> list[str]:
    return sorted(path.name for path in out.iterdir() if path.name.startswith(("checkpoint-", "tmp-")))


def test_killed_while_saving_resumes_from_the_last_whole_checkpoint(setup, tmp_path):
    train_consistency(setup["model"], setup["data"], tmp_path / "straight", **OPTIONS)

    out, ready = tmp_path / "killed", tmp_path / "saving"
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    environment["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), environment.get("PYTHONPATH", "")])
    command = [sys.executable, str(WORKER), str(setup["model"]), str(setup["data"]), str(out), "4", str(ready)]
    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([*command, json.dumps(OPTIONS)], env=environment, stdout=log, stderr=log, cwd=TESTS)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), (tmp_path / "worker.log").read_text()[-4000:]
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    # The kill hit the save of step 4 after its weights and optimizer, before its RNG and trainer state.
    being_written = Path(ready.read_text())
    assert (being_written / "optimizer.pt").is_file() and not (being_written / "trainer_state.json").exists()

    recorder = _StepRecorder()
    with pytest.warns(UserWarning, match="tmp-checkpoint-4: a checkpoint whose writing was interrupted"):
        train_consistency(setup["model"], setup["data"], out, resume=True, callbacks=[recorder], **OPTIONS)
    assert recorder.steps == [3, 4, 5, 6]  # from checkpoint-2: the cut checkpoint-4 was not used
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"]  # whole ones, the leftover removed
    straight, resumed = _weights(tmp_path / "straight"), _weights(out)
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name


def test_checkpoints_are_whole_rotated_and_found_by_transformers(setup, tmp_path):
    out = tmp_path / "out"
    trainer = train_consistency(setup["model"], setup["data"], out, save_total_limit=2, **OPTIONS)
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"]
    for step in (4, 6):
        checkpoint = out / f"checkpoint-{step}"
        assert all((checkpoint / name).is_file() for name in RESUME_FILES), sorted(os.listdir(checkpoint))
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-6")
    assert trainer.state.best_model_checkpoint is None


def test_resume_skips_cut_checkpoints_and_removes_leftovers(setup, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train_consistency(setup["model"], setup["data"], out, callbacks=[_StepRecorder(stop_at=5)], **OPTIONS)
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    # What an older version left when killed while saving checkpoint-6 in place (weights cut short,
    # no trainer state), and a leftover staging folder of an interrupted save.
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"\0" * 10)
    (out / "tmp-checkpoint-8" / "checkpoint-8").mkdir(parents=True)
    (out / "tmp-checkpoint-8" / "checkpoint-8" / "optimizer.pt").write_bytes(b"\0" * 10)

    recorder = _StepRecorder()
    with pytest.warns(UserWarning) as warned:
        train_consistency(setup["model"], setup["data"], out, resume=True, callbacks=[recorder], **OPTIONS)
    messages = " ".join(str(warning.message) for warning in warned)
    assert "skipping" in messages and "checkpoint-6: it has no trainer_state.json" in messages
    assert "tmp-checkpoint-8: a checkpoint whose writing was interrupted" in messages
    assert recorder.steps == [5, 6]  # from checkpoint-4
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    transformers.AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-6"))  # replaced by a whole one


def test_non_empty_out_needs_resume_or_overwrite(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    short = dict(OPTIONS, max_steps=2)
    train_consistency(setup["model"], setup["data"], out, **short)
    before = _snapshot(out)
    assert "checkpoint-2/trainer_state.json" in before
    with pytest.raises(ValueError, match=r"not empty.*--resume.*--overwrite"):
        train_consistency(setup["model"], setup["data"], out, **short)
    with pytest.raises(ValueError, match="give one of them"):
        train_consistency(setup["model"], setup["data"], out, resume=True, overwrite=True, **short)
    assert _snapshot(out) == before  # refused before writing anything

    train_consistency(setup["model"], setup["data"], out, overwrite=True, **dict(short, max_steps=3, save_steps=3))
    assert _checkpoints(out) == ["checkpoint-3"]  # the earlier run's checkpoint-2 cannot be resumed by mistake
    assert _snapshot(out)["model.safetensors"] != before["model.safetensors"]

    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    with pytest.raises(ValueError, match="is a file"):
        train_consistency(setup["model"], setup["data"], a_file, overwrite=True, **short)
    assert a_file.read_text() == "precious"


@pytest.mark.parametrize("where", ["same", "inside", "holds", "symlink"])
def test_out_and_model_may_not_nest(setup, tmp_path, where):
    model = tmp_path / "run" / "model"
    shutil.copytree(setup["model"], model)
    out = {"same": model, "inside": model / "cllm", "holds": model.parent, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        os.symlink(model, out)  # resolved paths decide
    before = _snapshot(model.parent)
    for flags in (dict(resume=True), dict(overwrite=True)):
        with pytest.raises(ValueError, match="model folder"):
            train_consistency(model, setup["data"], out, **flags, **dict(OPTIONS, max_steps=1))
    assert _snapshot(model.parent) == before


def test_overwrite_keeps_a_lora_init_adapter_inside_out(setup, tmp_path):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    with pytest.raises(ValueError, match="lora_init"):
        train_consistency(setup["model"], setup["data"], out, lora=True, lora_init=out / "adapter", overwrite=True)


def test_train_command_refuses_a_non_empty_out_without_overwrite(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run")
    argv = ["train", "--model", str(setup["model"]), "--data", str(setup["data"]), "--out", str(out)]
    argv += ["--max-steps", "1", "--save-steps", "1", "--batch-size", "2"]
    with pytest.raises(ValueError, match="--overwrite"):
        cli.main(argv)
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert cli.main([*argv, "--overwrite"]) == 0
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and (out / "notes.txt").exists()
