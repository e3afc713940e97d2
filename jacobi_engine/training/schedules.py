"""Noise schedules: which intermediate state of a chunk's trajectory a training sample gets.

The noise of a state is the number of its slots that differ from the chunk's fixed point
(``wrong_tokens``). A trajectory's intermediate states run from the random initial guess (many
wrong tokens) to the state one Jacobi step before the fixed point (few).

* ``random``: a uniformly drawn intermediate state, whatever its noise (CLLM).
* ``progressive``: easy to hard over training, as in Jacobi Forcing. At training progress
  ``p`` in [0, 1] the eligible states are those with at most
  ``w_min + p * (w_max - w_min)`` wrong tokens (``w_min``/``w_max``: the least and most noisy
  intermediate state of this trajectory), and one of them is drawn uniformly. At ``p = 0`` only
  the least noisy states are eligible; at ``p = 1`` every state is, which is ``random``.
  States whose only wrong token is the last slot are left out when the trajectory has others:
  the consistency loss covers the logits from the first wrong slot to slot n-2, so such a state
  has nothing to learn from, and they are exactly the least noisy ones (measured: keeping them
  made the early, easy part of the schedule a no-op).

The draw takes an ``rng`` so that the trainer can key it on (seed, epoch, sample) and a resumed
run draws exactly what an uninterrupted one would; ``progress`` must then be a function of the
optimizer step, which :class:`jacobi_engine.training.trainer.TrajectoryCollator` derives from
the number of batches it has collated.
"""

from __future__ import annotations

NOISE_SCHEDULES = ("random", "progressive")


def wrong_tokens(state: list[int], fixed_point: list[int]) -> int:
    """Slots of ``state`` that differ from ``fixed_point`` (both [m] token ids)."""
    if len(state) != len(fixed_point):
        raise ValueError(f"state has {len(state)} slots but the fixed point has {len(fixed_point)}")
    return sum(token != target for token, target in zip(state, fixed_point))


def draw_state_index(states: list[list[int]], rng, schedule: str = "random", progress: float = 0.0) -> int:
    """Index ``j`` in ``0 .. len(states) - 2`` of the intermediate state a sample trains on.

    ``states``: the trajectory, ``states[-1]`` the fixed point; needs at least 2 states.
    ``progress`` in [0, 1] (only ``progressive`` reads it). Calls ``rng.randrange`` exactly once,
    so ``random`` draws the same index as the trainer did before schedules existed.
    """
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}")
    if len(states) < 2:
        raise ValueError("a trajectory needs at least one intermediate state and its fixed point")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if schedule == "random":
        return rng.randrange(len(states) - 1)
    fixed_point = states[-1]
    candidates = [j for j, state in enumerate(states[:-1]) if any(a != b for a, b in zip(state[:-1], fixed_point[:-1]))]
    candidates = candidates or list(range(len(states) - 1))
    noise = {j: wrong_tokens(states[j], fixed_point) for j in candidates}
    least, most = min(noise.values()), max(noise.values())
    cap = least + progress * (most - least)
    eligible = [j for j in candidates if noise[j] <= cap + 1e-9]
    return eligible[rng.randrange(len(eligible))]
