"""ConsistencyTrainer: collator layout, stop-gradient teacher, training for both losses,
from_pretrained checkpoints, resume after a kill, LoRA, and a 2-process gloo DDP run."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from models import tiny_model

from jacobi_engine import cli
from jacobi_engine.training import toy
from jacobi_engine.training.collect import collect_trajectories
from jacobi_engine.training.recipe import train_consistency
from jacobi_engine.training.trainer import ConsistencyTrainer, TrajectoryCollator, pick_states

BLOCK = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model + tokenizer and 8 prompts' trajectories (3 chunks each)."""
    root = tmp_path_factory.mktemp("trainer")
    tokenizer = toy.train_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = [{"prompt": text, "answer": "return None"} for text in toy.stdlib_prompts(8, max_chars=40)]
    collect_trajectories(
        model, tokenizer, prompts, root / "data", block_size=BLOCK, max_new_tokens=12, eos_token_id=[], progress=False
    )
    return {"model": root / "model", "data": root / "data", "root": root}


def _weights(model_or_dir):
    if not isinstance(model_or_dir, torch.nn.Module):
        model_or_dir = transformers.AutoModelForCausalLM.from_pretrained(str(model_or_dir))
    return {name: tensor.detach().clone() for name, tensor in model_or_dir.state_dict().items()}


def _rows():
    return [
        {
            "prompt_index": 0,
            "prompt_length": 2,
            "prompt_ids": [1, 5, 6, 7],  # real prompt [1, 5] + an earlier chunk [6, 7]
            "states": [[8, 0, 0], [8, 9, 0], [8, 9, 10]],
            "fixed_point": [8, 9, 10],
            "label_ids": [40, 41, 2],
        },
        {
            "prompt_index": 1,
            "prompt_length": 1,
            "prompt_ids": [1],
            "states": [[3, 3], [3, 4]],
            "fixed_point": [3, 4],
            "label_ids": [50, 2],
        },
    ]


def test_pick_states():
    states = [[1, 0, 0], [1, 2, 0], [1, 2, 3]]
    rng = random.Random(0)
    for _ in range(20):
        student, teacher = pick_states(states, "global", rng)
        assert teacher == states[-1] and student in states[:-1]
        student, teacher = pick_states(states, "local", rng)
        assert states.index(teacher) == states.index(student) + 1
    assert pick_states([[4, 5]], "global", rng) == ([4, 5], [4, 5])


def test_collator_layout():
    batch = TrajectoryCollator(loss="global", rng=random.Random(0))(_rows())
    # Width: longest prompt (4) + longest block (3); block starts at len(prompt_ids).
    assert batch["block_start"].tolist() == [4, 1]
    student, teacher = batch["student_input_ids"], batch["teacher_input_ids"]
    assert teacher.tolist() == [[1, 5, 6, 7, 8, 9, 10], [1, 3, 4, 0, 0, 0, 0]]
    assert student[0, :4].tolist() == [1, 5, 6, 7] and student[0, 4:].tolist() in ([8, 0, 0], [8, 9, 0])
    assert student[1].tolist() == [1, 3, 3, 0, 0, 0, 0]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert batch["teacher_block"].tolist() == [[8, 9, 10], [3, 4, 0]]
    assert batch["slot_mask"].tolist() == [[True] * 3, [True, True, False]]
    # AR rows: [x; y*] with labels on y* only.
    assert batch["ar_input_ids"].tolist() == [[1, 5, 6, 7, 8, 9, 10], [1, 3, 4, 0, 0, 0, 0]]
    assert batch["ar_labels"].tolist() == [[-100, -100, -100, -100, 8, 9, 10], [-100, 3, 4, -100, -100, -100, -100]]


def test_collator_ground_truth_labels():
    batch = TrajectoryCollator(loss="local", use_labels=True, rng=random.Random(0))(_rows())
    # [real prompt; label_ids]: the earlier chunk [6, 7] is not part of the real prompt.
    assert batch["ar_input_ids"].tolist() == [[1, 5, 40, 41, 2], [1, 50, 2, 0, 0]]
    assert batch["ar_labels"].tolist() == [[-100, -100, 40, 41, 2], [-100, 50, 2, -100, -100]]
    rows = _rows()
    rows[1]["label_ids"] = []
    with pytest.raises(ValueError, match="ground-truth"):
        TrajectoryCollator(use_labels=True)(rows)


def test_collator_ar_corpus():
    """With an AR corpus, every AR row is one corpus pair (labels on its answer only), drawn
    deterministically per (seed, epoch, sample), and different epochs draw differently."""
    corpus = [([1, 60], [61, 62, 2]), ([1, 70, 71], [72, 2]), ([1], [80, 2])]
    collator = TrajectoryCollator(loss="global", seed=3, ar_corpus=corpus)
    first = collator(_rows())
    assert collator(_rows())["ar_input_ids"].tolist() == first["ar_input_ids"].tolist()
    for ids, labels, mask in zip(
        first["ar_input_ids"].tolist(), first["ar_labels"].tolist(), first["ar_attention_mask"].tolist()
    ):
        length = sum(mask)
        prompt, answer = next((p, a) for p, a in corpus if p + a == ids[:length])
        assert labels[:length] == [-100] * len(prompt) + answer
        assert all(label == -100 for label in labels[length:])
    draws = set()
    for epoch in range(12):
        collator.epoch = epoch
        draws.add(tuple(map(tuple, collator(_rows())["ar_input_ids"].tolist())))
    assert len(draws) > 1


def test_ar_data_file(setup, tmp_path):
    ar_file = tmp_path / "ar.jsonl"
    ar_file.write_text(
        "\n".join(json.dumps({"prompt": f"def f{i}():", "answer": f"return {i}"}) for i in range(5)) + "\n"
    )
    trainer = train_consistency(
        setup["model"],
        setup["data"],
        tmp_path / "out",
        ar_data=ar_file,
        max_steps=2,
        batch_size=2,
        learning_rate=1e-3,
        save_steps=100,
        logging_steps=1,
    )
    tokenizer = trainer.processing_class
    corpus = trainer.data_collator.ar_corpus
    assert len(corpus) == 5
    assert corpus[3] == (
        tokenizer("def f3():")["input_ids"],
        tokenizer("return 3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
    )
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="use_labels and ar_data"):
        train_consistency(setup["model"], setup["data"], tmp_path / "x", ar_data=ar_file, use_labels=True)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "no answer"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        train_consistency(setup["model"], setup["data"], tmp_path / "y", ar_data=tmp_path / "bad.jsonl")


def _trainer(setup, tmp_path, loss="global"):
    from datasets import load_from_disk

    model = transformers.AutoModelForCausalLM.from_pretrained(str(setup["model"]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, remove_unused_columns=False, report_to=[], max_steps=1
    )
    return ConsistencyTrainer(model=model, args=args, train_dataset=load_from_disk(str(setup["data"])), loss=loss)


def test_trainer_loss_and_collator_must_agree(setup, tmp_path):
    trainer = _trainer(setup, tmp_path, loss="local")
    assert trainer.data_collator.loss == "local"
    with pytest.raises(ValueError, match="local"):
        ConsistencyTrainer(
            model=trainer.model,
            args=trainer.args,
            train_dataset=trainer.train_dataset,
            data_collator=TrajectoryCollator(loss="global"),
            loss="local",
        )


def test_teacher_forward_runs_without_grad(setup, tmp_path):
    trainer = _trainer(setup, tmp_path)
    model = trainer.model
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    forwards = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: forwards.append(
            (kwargs["input_ids"].clone(), torch.is_grad_enabled(), output.logits.requires_grad)
        ),
        with_kwargs=True,
    )
    try:
        loss = trainer.compute_loss(model, batch)
    finally:
        handle.remove()
    assert len(forwards) == 2
    teacher_ids, teacher_grad_mode, teacher_logits_need_grad = forwards[0]
    assert torch.equal(teacher_ids, batch["teacher_input_ids"])
    assert not teacher_grad_mode and not teacher_logits_need_grad
    student_ids, student_grad_mode, _ = forwards[1]
    assert torch.equal(
        student_ids[: len(teacher_ids), : batch["student_input_ids"].shape[1]], batch["student_input_ids"]
    )
    assert student_grad_mode
    assert loss.requires_grad
    assert not trainer.teacher_logits(model, batch).requires_grad


def test_compute_loss_is_the_consistency_loss_of_the_student(setup, tmp_path):
    """With w = 0, compute_loss's value and gradients are those of consistency_loss on the
    student's block logits against the (detached) teacher's: alignment and stop-gradient."""
    trainer = _trainer(setup, tmp_path)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    teacher = trainer.teacher_logits(model, batch)
    assert teacher.grad_fn is None
    trainer.ar_weight = 0.0
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    from jacobi_engine.training.losses import consistency_loss
    from jacobi_engine.training.trainer import block_logits

    n = batch["student_block"].shape[1]
    logits = model(input_ids=batch["student_input_ids"], attention_mask=batch["attention_mask"]).logits
    student = block_logits(logits, batch["block_start"], n)
    manual = consistency_loss(
        student, teacher.clone(), batch["student_block"], batch["teacher_block"], batch["slot_mask"]
    )
    manual.backward()
    assert manual.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name


@pytest.mark.parametrize("loss", ["global", "local"])
def test_training_steps_and_checkpoints(setup, tmp_path, loss):
    out = tmp_path / "out"
    before = _weights(setup["model"])
    trainer = train_consistency(
        setup["model"], setup["data"], out, loss=loss, max_steps=4, save_steps=2, logging_steps=1,
        learning_rate=1e-3, batch_size=4,
    )  # fmt: skip
    assert trainer.state.global_step == 4
    logged = [entry for entry in trainer.state.log_history if "consistency_loss" in entry]
    assert len(logged) == 4
    assert all(torch.isfinite(torch.tensor([e["loss"], e["consistency_loss"], e["ar_loss"]])).all() for e in logged)
    assert any(entry["consistency_loss"] > 0 for entry in logged)
    after = _weights(out)  # the final model loads with from_pretrained
    assert any(not torch.equal(before[name], after[name]) for name in before)
    for name, tensor in _weights(trainer.model).items():
        assert torch.equal(after[name], tensor), name
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "optimizer.pt").exists()
        transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint))
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token == "</s>"


class _Killed(Exception):
    pass


class _KillAtStep(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step
        self.steps_run = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run.append(state.global_step)
        if state.global_step == self.step:
            raise _Killed


def test_resume_after_kill_matches_uninterrupted_run(setup, tmp_path):
    options = dict(max_steps=6, save_steps=2, logging_steps=1, learning_rate=1e-3, batch_size=4)
    train_consistency(setup["model"], setup["data"], tmp_path / "straight", **options)
    with pytest.raises(_Killed):
        train_consistency(setup["model"], setup["data"], tmp_path / "killed", callbacks=[_KillAtStep(5)], **options)
    assert (tmp_path / "killed" / "checkpoint-4").is_dir()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    counter = _KillAtStep(step=-1)
    resumed = train_consistency(
        setup["model"], setup["data"], tmp_path / "killed", resume=True, callbacks=[counter], **options
    )
    assert counter.steps_run == [5, 6]  # continued from checkpoint-4, did not start over
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]  # 1-4 restored from the checkpoint, 5-6 trained again
    straight, killed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for name in straight:
        assert torch.allclose(straight[name], killed[name], atol=1e-6), name


def test_lora(setup, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "out"
    before = _weights(setup["model"])
    trainer = train_consistency(
        setup["model"], setup["data"], out, lora=True, lora_r=4, max_steps=3, save_steps=3, learning_rate=1e-2,
        batch_size=4,
    )  # fmt: skip
    assert (out / "checkpoint-3" / "adapter_config.json").exists()  # checkpoints hold the adapter
    assert not (out / "adapter_config.json").exists()  # the final model is merged
    after = _weights(out)
    assert set(after) == set(before)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("q_proj" in name for name in changed)
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    assert trainer.state.global_step == 3


def test_train_command(setup, tmp_path):
    out = tmp_path / "out"
    argv = ["train", "--model", str(setup["model"]), "--data", str(setup["data"]), "--out", str(out)]
    argv += ["--loss", "local", "--ar-weight", "1", "--max-steps", "2", "--learning-rate", "1e-3", "--batch-size", "2"]
    argv += ["--use-labels", "--label-smoothing", "0.1", "--save-steps", "2", "--grad-accum", "2"]
    argv += ["--logging-steps", "1"]
    assert cli.main(argv) == 0
    transformers.AutoModelForCausalLM.from_pretrained(str(out))
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    for entry in state["log_history"]:
        if "loss" in entry:  # with gradient accumulation the loss is still a per-sample-batch mean
            assert entry["loss"] == pytest.approx(entry["consistency_loss"] + entry["ar_loss"], rel=1e-3, abs=1e-3)


def test_ddp_two_processes_gloo(setup, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "jacobi_engine.cli", "train", "--model", str(setup["model"]), "--data", str(setup["data"])]
    command += ["--out", str(out), "--max-steps", "3", "--batch-size", "2", "--save-steps", "3", "--logging-steps", "1"]
    command += ["--no-packing"]  # per-sample batches: the epoch arithmetic below counts samples
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-4000:]
    transformers.AutoModelForCausalLM.from_pretrained(str(out))
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    from datasets import load_from_disk

    samples = len(load_from_disk(str(setup["data"])))
    # Two processes x 2 samples per step: 3 steps cover 12 samples of the dataset.
    assert state["log_history"][-1]["epoch"] == pytest.approx(3 * 2 * 2 / samples)
