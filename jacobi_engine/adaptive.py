"""Choosing the block and the candidate tree per step from a measured cost model.

A Jacobi step pays for its width: on a memory-bound GPU a 16-token forward costs about one token's,
on a CPU in float32 it may cost twice as much. With ``block_size="auto"`` (and/or
``candidates="auto"``) the engine picks, at every host sync it already makes, the step shape
(a :class:`Shape`: block slots ``n``, candidates ``k`` of ``g`` tokens) that maximises expected new
tokens per second:

    score(shape) = E[tokens verified per forward | shape] / cost(shape)

* ``cost(shape)`` comes from a :class:`CostModel`: the engine times its own decode step over each shape
  it may use (a few steps each on a snapshot of the first call's state, at that call's real cache
  length, then restored), once per (batch size, dtype, device); ``JacobiEngine(cost_model=...)`` takes
  a saved one (:meth:`CostModel.save` / :meth:`CostModel.load`).
* ``E[tokens | shape]`` comes from the running statistics of the call (:class:`ShapePolicy`): the
  histogram of newly verified tokens per (row, forward), which every step keeps on the device and the
  sync reads together with the done flags (no extra host sync). For a plain block of ``n`` slots the
  estimate is ``sum_{j<=n} S(j)``, ``S(j)`` the observed share of (row, forward) pairs that verified at
  least ``j`` tokens among those whose block had ``j`` slots, extrapolated geometrically past the widest
  block seen; a shape's own observed mean takes over as it is used. A shape with candidates starts from
  its block's estimate times the lift candidates gave so far (optimistically 1.2 before any).

The greedy output does not depend on the choice (every shape's fixed point is greedy decoding), only
the speed does. Shape 1x0 is plain autoregressive decoding, so when no block pays for its width the
engine falls back to one token per forward. Exploration is deterministic and paid from a budget:
every ``explore_every``-th decision may try the least-used shape that could still beat the best if
its estimate were higher by an optimism of ``1 / sqrt(1 + its forwards)`` tokens, when the budget
(``explore_fraction`` = 5% of the chosen steps' cost, accumulated) covers that shape's step.

Under ``compile=True`` or ``cuda_graph=True`` each shape of the (small) set is compiled or captured
once, like any state, and the choice only picks which graph runs: no recompiles.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_BLOCK_SIZES = (1, 2, 4, 8, 16, 32)
COMPILED_BLOCK_SIZES = (1, 4, 16)  # a small fixed set when every shape is compiled or captured
DEFAULT_CANDIDATES = (0, 2, 4)
TIMED_STEPS = 2  # per shape, after one warm-up step


@dataclass(frozen=True, order=True)
class Shape:
    """A decode step's shape: ``block`` slots, ``candidates`` branches of ``candidate_len`` tokens."""

    block: int
    candidates: int = 0
    candidate_len: int = 0

    @property
    def tokens(self) -> int:
        return self.block + self.candidates * self.candidate_len

    def __str__(self) -> str:
        return f"{self.block}" if not self.candidates else f"{self.block}+{self.candidates}x{self.candidate_len}"


@dataclass(eq=False)  # hashable by identity: an engine setting
class CostModel:
    """Seconds per decode step, per (batch size, shape), measured on one device and dtype."""

    device: str
    dtype: str
    seconds: dict = field(default_factory=dict)  # {(batch, Shape): seconds}
    cache_length: dict = field(default_factory=dict)  # {batch: cache rows of the state it was timed on}
    measured_at: str = ""

    def cost(self, batch: int, shape: Shape) -> float | None:
        return self.seconds.get((batch, shape))

    def missing(self, batch: int, shapes) -> list[Shape]:
        return [shape for shape in shapes if (batch, shape) not in self.seconds]

    def matches(self, device: torch.device, dtype: torch.dtype) -> bool:
        return self.device == _device_name(device) and self.dtype == str(dtype).removeprefix("torch.")

    def save(self, path: str | Path) -> None:
        """Writes the model as JSON (see :meth:`load`)."""
        rows = [
            dict(batch=b, block=s.block, candidates=s.candidates, candidate_len=s.candidate_len, seconds=t)
            for (b, s), t in sorted(self.seconds.items())
        ]
        data = dict(device=self.device, dtype=self.dtype, measured_at=self.measured_at, steps=rows)
        data["cache_length"] = {str(b): n for b, n in self.cache_length.items()}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        try:
            seconds = {
                (int(r["batch"]), Shape(int(r["block"]), int(r["candidates"]), int(r["candidate_len"]))): float(
                    r["seconds"]
                )
                for r in data["steps"]
            }
            model = cls(str(data["device"]), str(data["dtype"]), seconds, measured_at=str(data.get("measured_at", "")))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a jacobi_engine cost model ({error})") from error
        model.cache_length = {int(b): int(n) for b, n in data.get("cache_length", {}).items()}
        return model


def _device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def new_cost_model(device: torch.device, dtype: torch.dtype) -> CostModel:
    return CostModel(_device_name(device), str(dtype).removeprefix("torch."), measured_at=time.strftime("%Y-%m-%d"))


def engine_cost_model(setting, adaptive: bool, device: torch.device, dtype: torch.dtype) -> CostModel | None:
    """An engine's cost model: ``setting`` (``JacobiEngine(cost_model=...)``: a saved one's path, a
    :class:`CostModel` or None), which must have been measured on ``device`` in ``dtype``; an adaptive
    engine without one gets a new, empty one (measured as its calls need it)."""
    cost_model = None
    if isinstance(setting, str):
        cost_model = CostModel.load(setting)
    elif setting is not None:
        cost_model = setting
    if cost_model is not None and not cost_model.matches(device, dtype):
        raise ValueError(
            f"cost_model was measured on {cost_model.device} in {cost_model.dtype}; this model is on "
            f"{device} in {dtype}: measure a new one (leave cost_model unset)"
        )
    if adaptive and cost_model is None:
        cost_model = new_cost_model(device, dtype)
    return cost_model


def save_cost_model(cost_model: CostModel | None, path: str | Path) -> None:
    """Writes an engine's measured step costs to ``path`` (:meth:`CostModel.save`)."""
    if cost_model is None:
        raise ValueError("this engine has no cost model: it is made by block_size='auto' or candidates='auto'")
    cost_model.save(path)


def measure(run_step, snapshot, restore, shapes, sync) -> dict:
    """{shape: seconds per step}: ``run_step(shape)`` once to warm up, then :data:`TIMED_STEPS` timed
    (the median), each shape on the same snapshot of the state, restored after."""
    costs = {}
    saved = snapshot()
    try:
        for shape in shapes:
            run_step(shape)
            sync()
            times = []
            for _ in range(TIMED_STEPS):
                restore(saved)
                started = time.perf_counter()
                run_step(shape)
                sync()
                times.append(time.perf_counter() - started)
            restore(saved)
            costs[shape] = sorted(times)[len(times) // 2]
    finally:
        restore(saved)
    return costs


class ShapePolicy:
    """The per-step choice of one call (see the module docstring).

    ``observe(shape, histogram_delta)`` adds what the steps run with ``shape`` since the last sync
    verified (the delta of the state's histogram: ``[a]`` = (row, forward) pairs that newly verified
    ``a`` tokens); ``choose()`` returns the shape of the next steps.
    """

    def __init__(
        self, shapes, costs: dict, explore_every: int = 8, prior_steps: float = 4.0, explore_fraction: float = 0.05
    ):
        if not shapes:
            raise ValueError("no shapes to choose from")
        self.shapes = sorted(shapes)
        self.costs = costs
        self.explore_every = explore_every
        # Exploration is paid from a budget that grows by ``explore_fraction`` of each chosen step's cost:
        # at most about that share of the time goes to shapes the estimates do not favour. It starts with
        # one step of the dearest shape, so a call can look once early.
        self.explore_fraction = explore_fraction
        self.budget = max(costs[shape] for shape in self.shapes)
        self.prior_steps = prior_steps
        self.steps = {shape: 0 for shape in self.shapes}  # (row, forward) pairs
        self.tokens = {shape: 0 for shape in self.shapes}
        self.reached: dict[int, float] = {}  # j -> pairs that verified >= j tokens, among blocks with >= j slots
        self.tried: dict[int, float] = {}  # j -> pairs whose block had >= j slots
        self.decisions = 0
        self.chosen: dict[Shape, int] = {shape: 0 for shape in self.shapes}

    def observe(self, shape: Shape, delta: list[int]) -> None:
        pairs = sum(delta[1:])
        if pairs <= 0:
            return
        self.steps[shape] += pairs
        self.tokens[shape] += sum(a * count for a, count in enumerate(delta))
        if shape.candidates == 0:
            at_least = 0
            for j in range(len(delta) - 1, 0, -1):
                at_least += delta[j]
                if j <= shape.block:
                    self.reached[j] = self.reached.get(j, 0) + at_least
                    self.tried[j] = self.tried.get(j, 0) + pairs

    # -- estimates ---------------------------------------------------------------------------
    def survival(self, j: int) -> float:
        """P(a forward verifies >= j tokens): observed where blocks were that wide, else extrapolated."""
        if j <= 1:
            return 1.0
        if self.tried.get(j, 0) > 0:
            return (self.reached.get(j, 0) + 0.5) / (self.tried[j] + 1.0)
        seen = [i for i in self.tried if self.tried[i] > 0 and i >= 2]
        if not seen:
            return 0.5 ** (j - 1)  # nothing seen yet: a modest prior, explored soon anyway
        last = max(seen)
        s_last = self.survival(last)
        s_before = self.survival(last - 1) if last > 2 else 1.0
        hazard = min(0.95, s_last / max(s_before, 1e-9))
        return s_last * hazard ** (j - last)

    def block_estimate(self, block: int) -> float:
        return sum(self.survival(j) for j in range(1, block + 1))

    def lift(self) -> float:
        """Tokens per forward of candidate shapes over their blocks' plain estimate, observed so far."""
        observed = [s for s in self.shapes if s.candidates and self.steps[s] > 0]
        if not observed:
            return 1.2
        ratios = [self.tokens[s] / self.steps[s] / self.block_estimate(s.block) for s in observed]
        return max(1.0, sum(ratios) / len(ratios))

    def estimate(self, shape: Shape) -> float:
        """Expected tokens verified per (row, forward): the shape's own mean blended with the model's."""
        prior = self.block_estimate(shape.block)
        if shape.candidates:
            prior = min(prior * self.lift(), shape.block + shape.candidate_len)
        steps = self.steps[shape]
        return (self.tokens[shape] + self.prior_steps * prior) / (steps + self.prior_steps)

    def score(self, shape: Shape) -> float:
        return self.estimate(shape) / self.costs[shape]

    # -- the choice ----------------------------------------------------------------------------
    def optimism(self, shape: Shape) -> float:
        """How many more tokens per forward ``shape`` might give than estimated: one untried, shrinking
        as it is tried (1 / sqrt(1 + forwards))."""
        return 1.0 / math.sqrt(1.0 + self.steps[shape])

    def choose(self) -> Shape:
        self.decisions += 1
        best = max(self.shapes, key=self.score)
        self.budget += self.explore_fraction * self.costs[best]
        if self.explore_every and self.decisions % self.explore_every == 0:
            best_score = self.score(best)
            hopeful = [
                s
                for s in self.shapes
                if s != best
                and s.block > 1
                and self.costs[s] <= self.budget
                and (self.estimate(s) + self.optimism(s)) / self.costs[s] >= best_score
            ]
            if hopeful:
                best = min(hopeful, key=lambda s: (self.steps[s], s))
                self.budget -= self.costs[best]
        self.chosen[best] += 1
        return best

    def summary(self) -> dict:
        return {
            str(s): dict(
                decisions=self.chosen[s],
                forwards=self.steps[s],
                tokens_per_forward=None if not self.steps[s] else self.tokens[s] / self.steps[s],
                seconds_per_step=self.costs[s],
            )
            for s in self.shapes
        }


def expected_tokens_per_second(policy: ShapePolicy) -> dict:
    return {str(s): policy.score(s) for s in policy.shapes if math.isfinite(policy.score(s))}
