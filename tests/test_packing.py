"""Packed consistency training: the mask against a hand-written one, and the packed losses and
gradients against the per-sample ones, computed one sample at a time with the model's own plain
forward (2-D mask, default positions), on several architectures."""

import random

import pytest
import torch
import torch.nn.functional as F
from models import tiny_model

from jacobi_engine.training import toy
from jacobi_engine.training.collect import collect_trajectories
from jacobi_engine.training.packed_attention import dense_packed_mask, packed_logits
from jacobi_engine.training.packing import PackedCollator, group_by_prompt, packed_losses
from jacobi_engine.training.trainer import TrajectoryCollator

BLOCK = 4
AR_WEIGHT = 2.0


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """Rows of 5 prompts' trajectories (3 chunks each, one prompt ending on a short chunk)."""
    tokenizer = toy.train_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    prompts = [{"prompt": text, "answer": "return None"} for text in toy.stdlib_prompts(5, max_chars=40)]
    dataset = collect_trajectories(
        model,
        tokenizer,
        prompts,
        tmp_path_factory.mktemp("packing") / "data",
        block_size=BLOCK,
        max_new_tokens=11,
        eos_token_id=[],
        progress=False,
    )
    rows = [dataset[index] for index in range(len(dataset))]
    assert any(len(row["fixed_point"]) < BLOCK for row in rows)  # a ragged last chunk is covered
    return {"rows": rows, "vocab_size": len(tokenizer)}


def test_mask_hand_layout():
    # prompt [a b], chunks of 2 and 2 tokens; noisy block 0 starts at slot 0 (positions 2-3),
    # noisy block 1 at slot 1 (position 5): [a b | c0 c0 c1 c1 | n0 n0 n1 | pad].
    layout = {
        "chunk_id": torch.tensor([[-1, -1, 0, 0, 1, 1, 0, 0, 1, -2]]),
        "noisy": torch.tensor([[False] * 6 + [True] * 3 + [False]]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 2, 3, 5, 0]]),
        "context_length": torch.tensor([[0, 0, 0, 0, 0, 0, 2, 2, 5, 0]]),
    }
    expected = torch.tensor(
        [
            # a  b  c0 c0 c1 c1 n0 n0 n1 pad
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # a
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # b
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # clean chunk 0
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # clean chunk 1
            [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 1, 0, 0, 0],  # noisy block 0: prompt + itself
            [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 1, 0],  # noisy block 1: prompt + chunk 0 + its slot 0 + itself
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding: itself only
        ],
        dtype=torch.bool,
    )
    assert torch.equal(dense_packed_mask(layout)[0, 0], expected)
    # A sliding window of 2 positions: noisy block 1 (position 5) keeps positions 4 and 5 only.
    windowed = dense_packed_mask(layout, window=2)[0, 0]
    assert windowed[8].tolist() == [False] * 4 + [True] + [False] * 3 + [True, False]
    assert windowed[5].tolist() == [False] * 4 + [True, True] + [False] * 4


def test_noisy_blocks_start_at_the_first_wrong_slot(trajectories):
    batch = PackedCollator(loss="global", seed=1)(group_by_prompt(trajectories["rows"]))
    flat_ids, flat_noisy = batch["input_ids"].flatten(), batch["noisy"].flatten()
    for sample in range(batch["student_block"].shape[0]):
        student, teacher = batch["student_block"][sample], batch["teacher_block"][sample]
        size = int(batch["slot_mask"][sample].sum())
        first = next((slot for slot in range(size) if student[slot] != teacher[slot]), size)
        index = batch["student_index"][sample, :size]
        assert torch.equal(flat_ids[index], student[:size])  # every slot reads the student's token
        assert flat_noisy[index].tolist() == [False] * first + [True] * (size - first)
        assert torch.equal(batch["teacher_index"][sample, :first], index[:first])


def test_group_by_prompt_refuses_chunks_that_do_not_tile(trajectories):
    rows = [dict(row) for row in trajectories["rows"]]
    records = group_by_prompt(rows)
    assert [record["chunk_indices"] for record in records] == [[0, 1, 2]] * 5
    broken = next(row for row in rows if row["chunk_index"] == 2)
    broken["prompt_ids"] = list(broken["prompt_ids"])[:-1]
    with pytest.raises(ValueError, match="cannot be packed"):
        group_by_prompt(rows)


def test_packed_draws_are_the_unpacked_draws(trajectories):
    """Chunk k of prompt p gets the state the unpacked collator gives sample (p, k)."""
    rows = trajectories["rows"]
    for loss in ("global", "local"):
        for schedule in ("random", "progressive"):
            unpacked = TrajectoryCollator(loss=loss, seed=5, epoch=2, noise_schedule=schedule, max_steps=4)
            packed = PackedCollator(loss=loss, seed=5, epoch=2, noise_schedule=schedule, max_steps=4)
            unpacked.batch_counter = packed.batch_counter = 2
            expected = unpacked(rows)
            batch = packed(group_by_prompt(rows))
            assert batch["noise_progress"].item() == expected["noise_progress"].item() == pytest.approx(2 / 3)
            assert torch.equal(batch["student_block"], expected["student_block"])
            assert torch.equal(batch["teacher_block"], expected["teacher_block"])


def _per_sample_losses(model, records, batch, loss, use_labels):
    """(consistency, AR) of the batch's samples, one unpadded plain forward per sample: KL(teacher ||
    student) summed over the slots after the first differing one, CE over the AR tokens; then
    the batch means the trainer defines."""
    kl_total, kl_count, ce_total, ce_count = 0.0, 0, 0.0, 0
    sample = 0
    for record in records:
        context = list(record["prompt_ids"])
        for fixed_point, states in zip(record["fixed_points"], record["states"]):
            size = len(fixed_point)
            student = batch["student_block"][sample, :size].tolist()
            teacher = batch["teacher_block"][sample, :size].tolist()
            sample += 1
            if loss == "global":
                assert teacher == fixed_point and (student in states[:-1] or len(states) == 1)
            else:
                assert any(states[j] == student and states[j + 1] == teacher for j in range(len(states) - 1)) or (
                    len(states) == 1
                )
            start = len(context)
            student_logits = model(input_ids=torch.tensor([context + student])).logits[0, start : start + size]
            with torch.no_grad():
                teacher_logits = model(input_ids=torch.tensor([context + teacher])).logits[0, start : start + size]
            first_wrong = next((slot for slot in range(size) if student[slot] != teacher[slot]), size)
            for slot in range(first_wrong, size - 1):
                p_teacher = F.log_softmax(teacher_logits[slot], -1)
                p_student = F.log_softmax(student_logits[slot], -1)
                kl_total = kl_total + (p_teacher.exp() * (p_teacher - p_student)).sum()
                kl_count += 1
            if not use_labels:
                ar_logits = model(input_ids=torch.tensor([context + fixed_point])).logits[0]
                ce = F.cross_entropy(
                    ar_logits[start - 1 : start + size - 1], torch.tensor(fixed_point), reduction="sum"
                )
                ce_total, ce_count = ce_total + ce, ce_count + size
            context += fixed_point
        if use_labels:  # one [real prompt; answer] row per prompt
            prompt = record["prompt_ids"][: record["prompt_length"]]
            answer = record["label_ids"]
            ar_logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            ce = F.cross_entropy(ar_logits[len(prompt) - 1 : -1], torch.tensor(answer), reduction="sum")
            ce_total, ce_count = ce_total + ce, ce_count + len(answer)
    return kl_total / kl_count, AR_WEIGHT * ce_total / ce_count


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral_sliding", "gemma2"])
@pytest.mark.parametrize("loss", ["global", "local"])
def test_packed_losses_equal_per_sample_losses(trajectories, arch, loss):
    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=trajectories["vocab_size"])
    records = group_by_prompt(trajectories["rows"])
    use_labels = loss == "local"  # both AR sources, without doubling the test count
    batch = PackedCollator(loss=loss, seed=1, use_labels=use_labels)(records)
    consistency, autoregressive = packed_losses(model, batch, ar_weight=AR_WEIGHT)
    (consistency + autoregressive).backward()
    packed_grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad()

    model.set_attn_implementation("eager" if arch == "gemma2" else "sdpa")  # the model's own attention
    expected_consistency, expected_ar = _per_sample_losses(model, records, batch, loss, use_labels)
    assert consistency.item() > 0.01 and autoregressive.item() > 0.01
    assert consistency.item() == pytest.approx(expected_consistency.item(), abs=1e-5)
    assert autoregressive.item() == pytest.approx(expected_ar.item(), abs=1e-5)
    (expected_consistency + expected_ar).backward()
    for name, param in model.named_parameters():
        assert torch.allclose(packed_grads[name], param.grad, atol=1e-5, rtol=1e-4), name


def test_padding_rows_do_not_change_losses(trajectories):
    """Two prompts of different lengths in one batch give each prompt's losses as alone."""
    model = tiny_model("llama", vocab_size=trajectories["vocab_size"])
    records = group_by_prompt(trajectories["rows"])[:2]
    records[1] = dict(records[1], prompt_ids=records[1]["prompt_ids"][:3])  # a shorter prompt
    collator = PackedCollator(loss="global", seed=1)
    with torch.no_grad():
        batch = collator(records)
        assert batch["input_ids"].shape[0] == 2 and (batch["chunk_id"][1] == -2).any()
        alone = [collator([record]) for record in records]
        logits = packed_logits(model, batch["input_ids"], batch)
        for row, single in enumerate(alone):
            width = single["input_ids"].shape[1]
            expected = packed_logits(model, single["input_ids"], single)
            assert torch.allclose(logits[row, :width], expected[0], atol=1e-5)


def test_flex_attention_forward_matches_sdpa(trajectories):
    """The BlockMask path gives the boolean-mask path's logits (no gradients: FlexAttention has no
    backward on CPU)."""
    model = tiny_model("llama", vocab_size=trajectories["vocab_size"])
    batch = PackedCollator(loss="global", seed=1, pad_to_multiple=128)(group_by_prompt(trajectories["rows"]))
    with torch.no_grad():
        sdpa = packed_logits(model, batch["input_ids"], batch, attention="sdpa")
        flex = packed_logits(model, batch["input_ids"], batch, attention="flex")
    real = batch["chunk_id"] != -2
    assert torch.allclose(sdpa[real], flex[real], atol=1e-4)


def test_bad_arguments(trajectories):
    model = tiny_model("llama", vocab_size=trajectories["vocab_size"])
    batch = PackedCollator(loss="global", rng=random.Random(0))(group_by_prompt(trajectories["rows"]))
    with pytest.raises(ValueError, match="attention"):
        packed_losses(model, batch, attention="flash")
    with pytest.raises(ValueError, match="noise_schedule"):
        PackedCollator(noise_schedule="linear")
