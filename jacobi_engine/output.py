"""What a ``generate`` call returns: :class:`JacobiOutput` and its :class:`JacobiStats`, built from the state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from jacobi_engine.state import StepState
from jacobi_engine.trajectory import SequenceTrajectory, build_trajectories, count_stationary


@dataclass
class JacobiStats:
    """What one ``generate`` call did.

    ``forward_passes`` counts model calls, prefill included (what a forward hook counts).
    ``tokens_per_forward`` is new tokens divided by per-sequence forwards (each sequence's
    prefill plus every decode forward it was still running in), so plain autoregressive
    decoding scores exactly 1.0. ``accepted_histogram[k]`` counts (sequence, decode forward)
    pairs that newly verified ``k`` tokens (kept in the output), in both modes, so
    ``sum(k * count) + batch == tokens_generated``. ``stationary_tokens`` counts tokens that were
    already correct while an earlier slot was still wrong and kept their value until verified
    (CLLM's term); it needs the per-step logs, so it is None unless ``record_trajectory=True``.
    ``capture_seconds`` is the CUDA-graph set-up (warm-up and capture, done once per state),
    ``compile_seconds`` the ``torch.compile`` of the step with ``compile=True`` (once per state, 0
    when the state was already compiled); both are kept out of ``decode_seconds`` (and so out of
    ``tokens_per_second``); so is ``cost_model_seconds``, the timing of step shapes an adaptive engine
    measures at its first call of a batch size. ``shapes`` (adaptive engines) gives, per step shape, the
    sync rounds that chose it, the (row, forward) pairs it ran and their tokens per forward.
    ``candidate_wins`` counts the (sequence, decode forward) pairs where a
    pooled candidate branch verified more tokens than the block.
    """

    block_size: int
    mode: str
    forward_passes: int = 0
    tokens_generated: int = 0
    tokens_per_forward: float = 0.0
    accepted_histogram: list[int] = field(default_factory=list)
    stationary_tokens: int | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    capture_seconds: float = 0.0
    candidate_wins: int = 0
    compile_seconds: float = 0.0
    cost_model_seconds: float = 0.0
    shapes: dict | None = None  # block_size/candidates="auto": per step shape, decisions and forwards

    @property
    def tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.tokens_generated / total if total > 0 else 0.0


@dataclass
class JacobiOutput:
    """``sequences`` LongTensor [B, T], laid out exactly like ``model.generate(do_sample=False)``:
    the (left-padded) prompt followed by the generated tokens, padded after EOS, and as long as
    the longest sequence. ``stats`` is None unless ``return_stats``; ``trajectories`` (one per
    sequence) is None unless ``record_trajectory``."""

    sequences: torch.Tensor
    stats: JacobiStats | None = None
    trajectories: list[SequenceTrajectory] | None = None


@dataclass
class Timings:
    """Wall seconds of a call's phases (see :class:`JacobiStats`)."""

    prefill: float = 0.0
    compile: float = 0.0
    capture: float = 0.0
    cost_model: float = 0.0
    decode: float = 0.0


def empty_output(input_ids: torch.Tensor, block_size: int, mode: str, return_stats: bool, record_trajectory: bool):
    """The output of a call with ``max_new_tokens=0``: the prompts, nothing decoded."""
    stats = JacobiStats(block_size, mode, accepted_histogram=[0] * (block_size + 1)) if return_stats else None
    return JacobiOutput(input_ids.clone(), stats, [] if record_trajectory else None)


def build_output(
    state: StepState,
    width: int,
    prompt_lengths: torch.Tensor,
    pad_token_id: int,
    mode: str,
    timings: Timings,
    return_stats: bool,
    record_trajectory: bool,
    shapes: dict | None = None,
) -> JacobiOutput:
    """The output of a call whose rows are all of ``state`` (prompt ``width`` columns each)."""
    batch = state.key.batch
    lengths = state.lengths.tolist()
    generated = [length - width for length in lengths]
    columns = torch.arange(width + max(generated), device=state.tokens.device)
    sequences = state.tokens[:, : width + max(generated)]
    sequences = torch.where(columns[None, :] < state.lengths[:, None], sequences, pad_token_id)
    trajectories = None
    if record_trajectory:
        steps_taken = int(state.step)
        final_tokens = [state.tokens[row, width : lengths[row]].tolist() for row in range(batch)]
        starts = state.log_lengths[:steps_taken] - (width + 1)
        trajectories = build_trajectories(
            state.log_blocks[:steps_taken],
            starts,
            state.log_accepted[:steps_taken],
            final_tokens,
            prompt_lengths.tolist(),
        )
    stats = None
    if return_stats:
        histogram = state.histogram.sum(dim=0).tolist()  # over the draft contexts
        histogram[0] = 0  # zeros are rows that had already finished, not forwards
        tokens = sum(generated)
        stats = JacobiStats(
            block_size=state.key.block_size,
            mode=mode,
            forward_passes=1 + int(state.step),
            tokens_generated=tokens,
            tokens_per_forward=tokens / (batch + sum(histogram)),
            accepted_histogram=histogram,
            stationary_tokens=None if trajectories is None else sum(count_stationary(t) for t in trajectories),
            prefill_seconds=timings.prefill,
            decode_seconds=timings.decode,
            capture_seconds=timings.capture,
            candidate_wins=int(state.candidate_wins),
            compile_seconds=timings.compile,
            cost_model_seconds=timings.cost_model,
            shapes=shapes,
        )
    return JacobiOutput(sequences, stats, trajectories)
