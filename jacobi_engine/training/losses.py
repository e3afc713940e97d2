"""Consistency (CLLM) and autoregressive losses, as pure functions of logits, ids and masks.

Notation. ``x`` is a chunk's prompt (the real prompt plus the chunks already converged) and a
Jacobi state ``y`` is the n-token block fed after it, slots ``0 .. n-1``. Slot 0 always holds the
correct token (the engine's convention: it is the token the previous forward predicted), so only
slots ``1 .. n-1`` can be wrong. ``y*`` is the fixed point: what greedy decoding writes there.

Alignment. The model's logits at slot ``t`` (its output at the position of ``y[t]``) predict
slot ``t + 1``: the Jacobi update is ``y'[t + 1] = argmax logits[t]``. So the logits at slots
``0 .. n-2`` are the ones that produce the next state of the block. The logits at slot ``n-1``
predict the token after the block, which the chunked engine throws away unless the block has
converged, so the consistency losses leave them out (as the CLLM reference does).

Which positions the consistency loss covers. Student and teacher see the same ``x``; they
differ only in the block. Logits at slot ``t`` depend on ``x`` and ``y[0 .. t]``: while every
slot up to ``t`` agrees between student and teacher, the two distributions are the same
function of the same input and their KL is exactly 0, whatever the weights. So the loss covers
slot ``t`` exactly when some slot ``<= t`` differs ("from the first wrong position onward"),
and the mean runs over those positions only, so that already-solved prefixes do not dilute it.
These are the predictions that must become right for Jacobi decoding to accept more than one
new token per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _zero_like_graph(tensor: torch.Tensor) -> torch.Tensor:
    # A zero that still depends on the student's graph: DDP and gradient accumulation expect a
    # backward through every parameter on every step, even when nothing is left to learn.
    return tensor.sum() * 0.0


def consistency_mask(
    student_ids: torch.Tensor, teacher_ids: torch.Tensor, slot_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Which logits of the student block the consistency loss covers.

    ``student_ids``/``teacher_ids`` int [B, n]: the two blocks (same ``x`` before them).
    ``slot_mask`` bool [B, n]: real slots (False marks padding, e.g. a last chunk shorter than
    n); default all True. Returns bool [B, n-1]: entry ``t`` is True when some real slot
    ``<= t`` differs between the two blocks and slot ``t + 1`` is real.
    """
    if student_ids.shape != teacher_ids.shape or student_ids.dim() != 2:
        raise ValueError(
            f"student_ids and teacher_ids must both be [B, n], got {tuple(student_ids.shape)} "
            f"and {tuple(teacher_ids.shape)}"
        )
    if slot_mask is None:
        slot_mask = torch.ones_like(student_ids, dtype=torch.bool)
    differs = (student_ids != teacher_ids) & slot_mask
    context_differs = differs.to(torch.int32).cumsum(dim=1) > 0
    return context_differs[:, :-1] & slot_mask[:, 1:]


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student) per position, averaged over the positions ``mask`` selects.

    ``student_logits``/``teacher_logits`` float [B, T, V]; ``mask`` bool [B, T]. The teacher is
    detached (stop-gradient). Computed in float32. Returns a scalar; 0 (still attached to the
    student's graph) when ``mask`` selects nothing.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"mask must be {tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}")
    count = mask.sum()
    if int(count) == 0:
        return _zero_like_graph(student_logits)
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    teacher_probs = teacher_log_probs.exp()
    # where(): a teacher probability that underflowed to 0 contributes 0, not 0 * -inf.
    per_token = torch.where(teacher_probs > 0, teacher_probs * (teacher_log_probs - student_log_probs), 0.0)
    per_position = per_token.sum(dim=-1)  # [B, T]
    return (per_position * mask).sum() / count


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    slot_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) over the student block's logits whose context differs from the teacher's.

    ``student_logits`` float [B, n, V]: the model's logits at the n block slots of ``[x; student_ids]``.
    ``teacher_logits`` float [B, n, V]: the same for ``[x; teacher_ids]`` (detached here).
    ``student_ids``/``teacher_ids`` int [B, n]; ``slot_mask`` bool [B, n] (real slots).
    Logits at slot t predict slot t+1; slots ``0 .. n-2`` enter, masked by :func:`consistency_mask`.
    Returns a scalar: the masked mean over (row, slot) pairs of the whole batch.
    """
    if student_logits.dim() != 3 or tuple(student_logits.shape[:2]) != tuple(student_ids.shape):
        raise ValueError(
            f"student_logits must be [B, n, V] matching student_ids [B, n], got {tuple(student_logits.shape)} "
            f"and {tuple(student_ids.shape)}"
        )
    mask = consistency_mask(student_ids, teacher_ids, slot_mask)
    return masked_kl(student_logits[:, :-1], teacher_logits[:, :-1], mask)


def global_consistency_loss(
    student_logits: torch.Tensor,
    fixed_point_logits: torch.Tensor,
    state_ids: torch.Tensor,
    fixed_point_ids: torch.Tensor,
    slot_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLLM's global consistency loss: map any intermediate state straight to the fixed point.

    Student: the model on ``[x; y_i]`` (``state_ids``); teacher: the model on ``[x; y*]``
    (``fixed_point_ids``, logits ``fixed_point_logits``). Shapes as in :func:`consistency_loss`.
    It is 0 when the state is the fixed point.
    """
    return consistency_loss(student_logits, fixed_point_logits, state_ids, fixed_point_ids, slot_mask)


def local_consistency_loss(
    student_logits: torch.Tensor,
    next_state_logits: torch.Tensor,
    state_ids: torch.Tensor,
    next_state_ids: torch.Tensor,
    slot_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLLM's local consistency loss: adjacent states of a trajectory should predict alike.

    Student: the model on ``[x; y_j]``; teacher: the model on ``[x; y_{j+1}]``, the next state
    of the same trajectory. Shapes as in :func:`consistency_loss`. It is 0 when ``y_j == y_{j+1}``.
    """
    return consistency_loss(student_logits, next_state_logits, state_ids, next_state_ids, slot_mask)


def ar_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: float = 10.0,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Weighted next-token cross-entropy: ``weight * mean CE`` over the labelled tokens.

    ``logits`` float [B, T, V]: the model's logits at every input position. ``labels`` int [B, T]:
    the input ids, with ``ignore_index`` wherever there is nothing to learn (prompt, padding).
    Logits at position t are scored against ``labels[:, t + 1]``. ``label_smoothing`` as in
    :func:`torch.nn.functional.cross_entropy`. The mean runs over the labelled tokens of the whole
    batch; 0 (attached to the graph) when there are none.
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    predictions = logits[:, :-1].float()
    targets = labels[:, 1:].to(torch.long)
    count = (targets != ignore_index).sum()
    if int(count) == 0:
        return _zero_like_graph(logits)
    total = F.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return weight * total / count
