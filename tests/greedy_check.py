"""Comparing engine output with Hugging Face greedy decoding, allowing only proven near-ties."""

from __future__ import annotations

import torch

# Two logits this close are a floating-point near-tie: a different but equally valid summation
# order (our block attention vs HF's) can flip their argmax.
NEAR_TIE = 1e-4


def hf_greedy(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _top2_gap(model, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """Gap between the two largest next-token logits after ``tokens`` (one row, HF full forward)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(tokens[None], attention_mask=mask[None], position_ids=positions[None]).logits[0, -1]
    top = logits.double().topk(2).values
    return float(top[0] - top[1])


def assert_matches_greedy(model, engine_sequences, hf_sequences, input_ids, attention_mask, pad_token_id):
    """Token-exact equality with HF greedy, except after a divergence proven to be a near-tie.

    Returns the number of rows that diverged at a near-tie (callers may assert it is small).
    """
    width = input_ids.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    near_ties = 0
    for row in range(input_ids.shape[0]):
        ours = engine_sequences[row].tolist()
        theirs = hf_sequences[row].tolist()
        # Both pad to their own batch length; compare up to the longer one.
        length = max(len(ours), len(theirs))
        ours += [pad_token_id] * (length - len(ours))
        theirs += [pad_token_id] * (length - len(theirs))
        if ours == theirs:
            continue
        first = next(i for i in range(length) if ours[i] != theirs[i])
        assert first >= width, f"row {row}: prompt changed at column {first}"
        prefix = torch.tensor(theirs[:first], dtype=torch.long)
        mask = torch.cat([attention_mask[row].cpu(), torch.ones(first - width, dtype=torch.long)])
        gap = _top2_gap(model, prefix.to(input_ids.device), mask.to(input_ids.device))
        assert gap < NEAR_TIE, (
            f"row {row} diverges at generated token {first - width}: engine {ours[first]} vs HF {theirs[first]}, "
            f"top-2 logit gap {gap:.3g} is not a near-tie\nengine {ours[width:]}\nHF     {theirs[width:]}"
        )
        near_ties += 1
    if near_ties == 0:
        assert tuple(engine_sequences.shape) == tuple(hf_sequences.shape), (
            f"shape {tuple(engine_sequences.shape)} != HF {tuple(hf_sequences.shape)}"
        )
    return near_ties
