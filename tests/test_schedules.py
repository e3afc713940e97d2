"""Noise schedules: which states are eligible at a given progress, and that the progress the
collator uses is the optimizer step of the batch, across epochs, gradient accumulation and a resume."""

import random

import pytest
import torch
import transformers
from models import tiny_model

from jacobi_engine.training import toy
from jacobi_engine.training.collect import collect_trajectories
from jacobi_engine.training.recipe import train_consistency
from jacobi_engine.training.schedules import draw_state_index, wrong_tokens

# Noise (wrong tokens vs the fixed point [1, 2, 3, 4]) of the intermediate states: 3, 2, 3, 1, 1;
# state 4 is wrong in its last slot only, which the consistency loss never covers.
STATES = [[1, 9, 9, 9], [1, 2, 9, 9], [1, 9, 9, 8], [1, 9, 3, 4], [1, 2, 3, 9], [1, 2, 3, 4]]


def test_wrong_tokens():
    assert [wrong_tokens(state, STATES[-1]) for state in STATES] == [3, 2, 3, 1, 1, 0]
    with pytest.raises(ValueError):
        wrong_tokens([1, 2], [1, 2, 3])


def _drawn(progress, draws=200):
    rng = random.Random(0)
    return {draw_state_index(STATES, rng, "progressive", progress) for _ in range(draws)}


def test_progressive_eligible_states_grow_with_progress():
    assert _drawn(0.0) == {3}  # the least noisy state only (1 wrong token); state 4 has nothing to learn
    assert _drawn(0.5) == {1, 3}  # cap 1 + 0.5 * (3 - 1) = 2 wrong tokens
    assert _drawn(1.0) == {0, 1, 2, 3}  # every state with a covered position
    rng = random.Random(0)
    assert {draw_state_index(STATES, rng, "random", 0.0) for _ in range(200)} == {0, 1, 2, 3, 4}
    only_last_slot = [[1, 2, 3, 9], [1, 2, 3, 8], [1, 2, 3, 4]]
    rng = random.Random(0)
    assert {draw_state_index(only_last_slot, rng, "progressive", 0.0) for _ in range(50)} == {0, 1}


def test_random_schedule_draws_what_the_trainer_drew_before_schedules():
    first, second = random.Random(7), random.Random(7)
    for _ in range(20):
        assert draw_state_index(STATES, first) == second.randrange(len(STATES) - 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise_schedule"):
        draw_state_index(STATES, random.Random(0), "cosine")
    with pytest.raises(ValueError, match="progress"):
        draw_state_index(STATES, random.Random(0), "progressive", 1.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedules")
    tokenizer = toy.train_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    collect_trajectories(
        model, tokenizer, toy.stdlib_prompts(5, max_chars=40), root / "data", block_size=4, max_new_tokens=12,
        eos_token_id=[], progress=False,
    )  # fmt: skip
    return root


class _KillAt(transformers.TrainerCallback):
    def __init__(self, kill_at):
        self.kill_at = kill_at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.kill_at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("packing", [True, False])
def test_progress_is_the_step_across_epochs_accumulation_and_resume(setup, tmp_path, packing):
    """5 prompts at batch 2 (packed) or 15 samples at batch 3 make an odd number of batches per epoch, so with grad_accum 2 each epoch ends
    on a partial step; the progress of every batch must still be step / (max_steps - 1), also
    after a kill and resume, and the resumed weights must equal an uninterrupted run's."""
    seen = {}
    original = None

    def recording_compute_loss(trainer_self, model, inputs, *args, **kwargs):
        seen.setdefault(trainer_self.args.output_dir, []).append(
            (trainer_self.state.global_step, inputs["noise_progress"].item())
        )
        return original(trainer_self, model, inputs, *args, **kwargs)

    from jacobi_engine.training import packing as packing_module
    from jacobi_engine.training import trainer as trainer_module

    cls = packing_module.PackedConsistencyTrainer if packing else trainer_module.ConsistencyTrainer
    original = cls.compute_loss
    options = dict(
        max_steps=5, save_steps=2, batch_size=2 if packing else 3, grad_accum=2, learning_rate=1e-3,
        noise_schedule="progressive", packing=packing, logging_steps=1,
    )  # fmt: skip
    try:
        cls.compute_loss = recording_compute_loss
        train_consistency(setup / "model", setup / "data", tmp_path / "straight", **options)
        with pytest.raises(KeyboardInterrupt):
            train_consistency(setup / "model", setup / "data", tmp_path / "killed", callbacks=[_KillAt(3)], **options)
        train_consistency(setup / "model", setup / "data", tmp_path / "killed", resume=True, **options)
    finally:
        cls.compute_loss = original
    straight = seen[str(tmp_path / "straight")]
    assert {step for step, _ in straight} == set(range(5))
    for step, progress in straight:
        assert progress == pytest.approx(step / 4)
    after_checkpoint = [entry for entry in straight if entry[0] >= 2]
    assert seen[str(tmp_path / "killed")][-len(after_checkpoint) :] == after_checkpoint
    load = transformers.AutoModelForCausalLM.from_pretrained
    a, b = load(str(tmp_path / "straight")).state_dict(), load(str(tmp_path / "killed")).state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
