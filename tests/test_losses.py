"""The consistency and AR losses against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from jacobi_engine.training.losses import (
    ar_loss,
    consistency_loss,
    consistency_mask,
    global_consistency_loss,
    local_consistency_loss,
    masked_kl,
)

LN3 = math.log(3.0)
# KL([.5, .5] || [.25, .75]) and KL([.75, .25] || [.5, .5]), by hand.
KL_HALF_VS_QUARTER = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
KL_THREE_QUARTERS_VS_HALF = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)


def test_mask_starts_at_first_differing_context():
    student = torch.tensor([[5, 1, 9, 9], [5, 7, 8, 9], [5, 6, 8, 9]])
    teacher = torch.tensor([[5, 1, 2, 3], [5, 7, 8, 9], [5, 7, 8, 9]])
    # Entry t: logits at slot t (context slots 0..t) predicting slot t+1.
    expected = torch.tensor(
        [
            [False, False, True],  # first difference at slot 2
            [False, False, False],  # identical blocks
            [False, True, True],  # first difference at slot 1; later equal slots still count
        ]
    )
    assert torch.equal(consistency_mask(student, teacher), expected)


def test_mask_ignores_padding_slots():
    student = torch.tensor([[5, 1, 2, 9], [5, 8, 2, 0], [5, 8, 2, 3]])
    teacher = torch.tensor([[5, 1, 2, 3], [5, 1, 2, 0], [5, 1, 2, 3]])
    slot_mask = torch.tensor([[True, True, True, False], [True, True, True, False], [True, False, True, True]])
    expected = torch.tensor(
        [
            [False, False, False],  # the only difference is in a padding slot
            [False, True, False],  # slot 2's prediction targets padding slot 3
            [False, False, False],  # a masked slot never counts as a difference
        ]
    )
    assert torch.equal(consistency_mask(student, teacher, slot_mask), expected)


def test_masked_kl_hand_values():
    student = torch.tensor([[[0.0, LN3], [0.0, 0.0], [9.0, -9.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [-9.0, 9.0]]])
    both = torch.tensor([[True, True, False]])
    assert masked_kl(student, teacher, both).item() == pytest.approx(
        (KL_HALF_VS_QUARTER + KL_THREE_QUARTERS_VS_HALF) / 2, rel=1e-6
    )
    second = torch.tensor([[False, True, False]])
    assert masked_kl(student, teacher, second).item() == pytest.approx(KL_THREE_QUARTERS_VS_HALF, rel=1e-6)


def test_kl_is_forward_teacher_to_student():
    student = torch.tensor([[[0.0, LN3]]])
    teacher = torch.tensor([[[0.0, 0.0]]])
    mask = torch.tensor([[True]])
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert reverse != pytest.approx(KL_HALF_VS_QUARTER)
    assert masked_kl(student, teacher, mask).item() == pytest.approx(KL_HALF_VS_QUARTER, rel=1e-6)


def test_consistency_loss_covers_only_positions_after_first_wrong_slot():
    # n = 3: logits at slots 0 and 1 can enter. Slot 1 is the first wrong one, so only the
    # logits at slot 1 count; slot 0's (wildly different) logits and slot 2's are ignored.
    student_ids = torch.tensor([[5, 9, 9]])
    teacher_ids = torch.tensor([[5, 1, 2]])
    student = torch.tensor([[[20.0, -20.0], [0.0, LN3], [5.0, 0.0]]])
    teacher = torch.tensor([[[-20.0, 20.0], [0.0, 0.0], [0.0, 5.0]]])
    loss = global_consistency_loss(student, teacher, student_ids, teacher_ids)
    assert loss.item() == pytest.approx(KL_HALF_VS_QUARTER, rel=1e-6)


def test_consistency_loss_batch_mean_is_over_masked_positions():
    # Row 0 contributes one position, row 1 two, row 2 none: the mean is over the three.
    student_ids = torch.tensor([[5, 9, 9], [5, 8, 8], [5, 1, 2]])
    teacher_ids = torch.tensor([[5, 1, 9], [5, 8, 2], [5, 1, 2]])
    slot_mask = torch.ones(3, 3, dtype=torch.bool)
    a, b = [0.0, LN3], [0.0, 0.0]
    student = torch.tensor([[b, a, b], [b, b, b], [a, a, b]])
    teacher = torch.tensor([[b, b, b], [b, [LN3, 0.0], b], [b, b, b]])
    # row 0: slot 1 wrong -> t=1: KL(b || a); row 1: slot 2 wrong -> t=2 is beyond n-2: nothing.
    # So only row 0 counts; row 2 is identical -> excluded.
    loss = consistency_loss(student, teacher, student_ids, teacher_ids, slot_mask)
    assert loss.item() == pytest.approx(KL_HALF_VS_QUARTER, rel=1e-6)
    # Make row 1 wrong from slot 1: it adds t=1, KL([.75,.25] || [.5,.5]).
    student_ids[1, 1] = 3
    loss = consistency_loss(student, teacher, student_ids, teacher_ids, slot_mask)
    assert loss.item() == pytest.approx((KL_HALF_VS_QUARTER + KL_THREE_QUARTERS_VS_HALF) / 2, rel=1e-6)


def test_consistency_loss_is_zero_when_nothing_is_wrong():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 5, 7, generator=generator)
    ids = torch.randint(0, 7, (2, 5), generator=generator)
    for loss_fn in (global_consistency_loss, local_consistency_loss):
        loss = loss_fn(student, teacher, ids, ids.clone())
        assert loss.item() == 0.0
        loss.backward()  # still attached to the student's graph (DDP needs every step to backward)
        assert torch.count_nonzero(student.grad) == 0


def test_identical_logits_give_zero_even_when_wrong():
    logits = torch.randn(1, 4, 6)
    loss = consistency_loss(logits, logits.clone(), torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 0, 0, 0]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_student_only():
    student = torch.tensor([[[0.0, LN3], [0.0, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]], requires_grad=True)
    loss = consistency_loss(student, teacher, torch.tensor([[4, 9]]), torch.tensor([[4, 5]]))
    # n = 2: only the logits at slot 0 enter; their context (slot 0) is the same in both
    # blocks, so there is nothing to learn even though slot 1 differs.
    assert loss.item() == 0.0
    # Slot 0 never differs in real trajectories, but the function only looks at the ids.
    loss = consistency_loss(student, teacher, torch.tensor([[3, 9]]), torch.tensor([[4, 5]]))
    loss.backward()
    assert teacher.grad is None
    # d KL(p || softmax(s)) / ds = softmax(s) - p, at the single covered position.
    p = torch.softmax(torch.tensor([1.0, 2.0]), dim=0)
    expected = torch.tensor([[[0.25, 0.75], [0.0, 0.0]]])
    expected[0, 0] -= p
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_local_consistency_uses_next_state_as_teacher():
    state = torch.tensor([[5, 9, 9]])
    next_state = torch.tensor([[5, 1, 9]])
    student = torch.tensor([[[0.0, 0.0], [0.0, LN3], [0.0, 0.0]]])
    next_logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    loss = local_consistency_loss(student, next_logits, state, next_state)
    assert loss.item() == pytest.approx(KL_HALF_VS_QUARTER, rel=1e-6)


def test_ar_loss_hand_values():
    logits = torch.tensor([[[0.0, LN3], [LN3, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 1]])
    # logits[0] scores labels[1] = 1: p = .75; logits[1] scores labels[2] = 1: p = .25.
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert ar_loss(logits, labels, weight=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert ar_loss(logits, labels).item() == pytest.approx(10 * expected, rel=1e-6)  # CLLM's default w


def test_ar_loss_masks_and_last_position():
    logits = torch.tensor([[[0.0, LN3], [LN3, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, -100]])
    changed = logits.clone()
    changed[0, 1] = torch.tensor([7.0, -7.0])  # scores an ignored label
    changed[0, 2] = torch.tensor([-7.0, 7.0])  # the last position predicts past the end
    assert ar_loss(logits, labels, weight=1.0).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert ar_loss(changed, labels, weight=1.0).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    nothing = torch.full_like(labels, -100)
    assert ar_loss(logits, nothing).item() == 0.0


def test_ar_loss_label_smoothing_hand_value():
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1]])
    eps = 0.2
    # (1 - eps) * NLL + eps * mean over the vocabulary of -log p.
    expected = (1 - eps) * -math.log(0.75) + eps * (-math.log(0.25) - math.log(0.75)) / 2
    assert ar_loss(logits, labels, weight=1.0, label_smoothing=eps).item() == pytest.approx(expected, rel=1e-6)


def test_batch_shapes_are_checked():
    with pytest.raises(ValueError):
        consistency_loss(
            torch.zeros(1, 3, 2),
            torch.zeros(1, 3, 2),
            torch.zeros(1, 4, dtype=torch.long),
            torch.zeros(1, 4, dtype=torch.long),
        )
    with pytest.raises(ValueError):
        ar_loss(torch.zeros(1, 3, 2), torch.zeros(1, 2, dtype=torch.long))
