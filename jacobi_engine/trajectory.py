"""Jacobi trajectories and the statistics derived from them.

The engine logs, for every decode forward, the block it fed and where that block starts in
the generated tokens. Everything here is computed on the host after generation, from those
logs and the final tokens, so recording costs one small device copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class JacobiStep:
    """One decode forward of one sequence.

    ``start`` is the index, in the generated tokens, of the block's first slot; ``guesses`` are
    the ``n`` tokens fed (slot 0 is known-correct); ``n_accepted`` is how many of them the
    forward verified (1..n).
    """

    start: int
    guesses: list[int]
    n_accepted: int


@dataclass
class BlockTrajectory:
    """The states one block went through, from its initial guess to its fixed point.

    ``states[i]`` is the block fed at the i-th forward over positions ``start .. start+n-1``
    of the generated tokens; ``fixed_point`` holds the final tokens there (shorter than ``n``
    when generation ended inside the block).
    """

    start: int
    states: list[list[int]]
    fixed_point: list[int]
    n_accepted: list[int] = field(default_factory=list)  # per state: slots its forward verified


@dataclass
class SequenceTrajectory:
    prompt_length: int
    tokens: list[int]  # the generated tokens (no prompt, no padding)
    steps: list[JacobiStep] = field(default_factory=list)

    def blocks(self) -> list[BlockTrajectory]:
        """Group steps that iterate the same block (chunked mode) into one trajectory each.

        In sliding mode every forward starts at a new position, so each block has one state.
        """
        grouped: list[BlockTrajectory] = []
        for step in self.steps:
            if grouped and grouped[-1].start == step.start:
                grouped[-1].states.append(list(step.guesses))
                grouped[-1].n_accepted.append(step.n_accepted)
                continue
            n = len(step.guesses)
            grouped.append(
                BlockTrajectory(
                    start=step.start,
                    states=[list(step.guesses)],
                    fixed_point=self.tokens[step.start : step.start + n],
                    n_accepted=[step.n_accepted],
                )
            )
        return grouped


def build_trajectories(
    blocks: torch.Tensor,
    starts: torch.Tensor,
    accepted: torch.Tensor,
    final_tokens: list[list[int]],
    prompt_lengths: list[int],
) -> list[SequenceTrajectory]:
    """Turn the engine's step logs into trajectories.

    ``blocks`` [steps, B, n] are the blocks fed, ``starts`` [steps, B] the index of slot 0 in the
    generated tokens and ``accepted`` [steps, B] the accepted counts (0: the sequence had finished).
    """
    trajectories = [SequenceTrajectory(prompt_length=p, tokens=t) for p, t in zip(prompt_lengths, final_tokens)]
    all_blocks, all_starts, all_accepted = blocks.tolist(), starts.tolist(), accepted.tolist()
    for step_blocks, step_starts, step_accepted in zip(all_blocks, all_starts, all_accepted):
        for row, trajectory in enumerate(trajectories):
            if step_accepted[row] > 0:
                trajectory.steps.append(JacobiStep(step_starts[row], step_blocks[row], step_accepted[row]))
    return trajectories


def count_stationary(trajectory: SequenceTrajectory) -> int:
    """Stationary tokens (CLLM): correct before they could be verified, and unchanged until verified.

    A position counts once, when it is first verified as a guess (slot >= 1), if at the previous
    forward of its sequence it was already in the block, already equal to its final token, and
    not yet verified because an earlier slot was wrong.
    """
    final = trajectory.tokens
    verified: set[int] = set()
    waiting_correct: set[int] = set()  # correct but unverified at the previous step
    count = 0
    for step in trajectory.steps:
        now_waiting: set[int] = set()
        for slot, guess in enumerate(step.guesses):
            position = step.start + slot
            if position >= len(final):
                break
            if slot < step.n_accepted:
                if position not in verified:
                    if slot >= 1 and position in waiting_correct:
                        count += 1
                    verified.add(position)
            elif guess == final[position]:
                now_waiting.add(position)
        waiting_correct = now_waiting
    return count
