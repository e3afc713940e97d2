"""Choosing the block and the candidate tree per step from a measured cost model.

A Jacobi step pays for its width: on a memory-bound GPU a 16-token forward costs about one token's,
on a CPU in float32 it may cost twice as much. With ``block_size="auto"`` (and/or
``candidates="auto"``) the engine picks, at every host sync it already makes, the step shape
(a :class:`Shape`: block slots ``n``, candidates ``k`` of ``g`` tokens) that maximises expected new
tokens per second:

    score(shape) = E[tokens verified per forward | shape] / cost(shape)

* ``cost(shape)`` comes from a :class:`CostModel`: the engine times its own decode step over each shape
  it may use (rounds over the shapes, interleaved, on a snapshot of the first call's state at that
  call's real cache length, then restored; made non-decreasing in the step's tokens), once per (batch
  size, dtype, device); ``JacobiEngine(cost_model=...)`` takes a saved one (:meth:`CostModel.save` /
  :meth:`CostModel.load`, ``JacobiEngine.save_cost_model``).
* ``E[tokens | shape]`` comes from running statistics (:class:`ShapePolicy`): the histogram of newly
  verified tokens per (row, forward) and **draft context**, which every step keeps on the device and the
  sync reads together with the done flags (no extra host sync). A row's draft context is how many
  tokens the guess strategy drafted for its next block (n-gram lookup: the continuation of the latest
  earlier occurrence; :func:`jacobi_engine.guesses.draft_context` buckets 0, 1, 2-3, 4-7, 8-15, 16+),
  so a step is sized by the drafts its rows hold: a row with a long draft is worth a wide block, one
  without often only one slot. For a plain block of ``n`` slots the estimate is ``sum_{j<=n} S(j)``,
  ``S(j)`` the observed share of (row, forward) pairs that verified at least ``j`` tokens among those
  whose block had ``j`` slots (per context, shrunk towards all contexts' share while a context has
  few pairs), extrapolated geometrically past the widest block seen: one model for every width, so the
  choice does not chase one width's noise. A shape with candidates starts from its block's estimate
  times the lift candidates gave so far (optimistically 1.2 before any), and its own observed mean
  takes over as it is used. A batch's score sums its rows' estimates.
* ``cost(shape)`` is then corrected by the wall time of the steps the calls run (between the syncs
  they make anyway; greedy calls): the median of the measured cost, weighing as 3 steps, and the
  shape's last 32 (a seeded sampling call keeps the measured costs, so its shapes, and with them its
  draws, do not depend on wall time).
* The survival model scores a block by its next step, as if it started afresh; a block held for several
  steps also converges its far slots for the steps after. So each plain shape's estimate is multiplied
  by its **held calibration** (:meth:`ShapePolicy.calibration`): the tokens its steps verified when they
  continued a run of that shape, over what the survival model expected of them when chosen, never
  below 1. The choice is then credited for what a shape does while held, not scored by its next step
  alone (the myopic choice settles on a narrow block whose wide rival was only measured on its first
  steps).
* Changing shape costs host time (a widening fills its new slots); the switches are timed, and the next
  step of another shape than the current one pays the median of recent ones alike (greedy calls).
* Plain steps leave the candidate pool alone; the first step with candidates after them feeds it the
  output they committed (:func:`jacobi_engine.step.catch_up_pool`), so the pool's upkeep is not paid by
  every plain step.
* Widening does not restart a wide block's convergence: its new slots take what that block held when
  it was last left, at the same sequence positions (``Runner.switch``), then the rows' drafts.
* The statistics of a greedy call carry into the next call of the same batch size, halved
  (:meth:`ShapePolicy.carried`), so an engine explores once, not at every call; a sampling call starts
  from nothing, so that a seeded call repeats itself (its draws depend on the shapes it runs).

The greedy output does not depend on the choice (every shape's fixed point is greedy decoding), only
the speed does. Shape 1x0 is plain autoregressive decoding, so when no block pays for its width the
engine falls back to one token per forward. Exploration is deterministic and paid from a budget:
every ``explore_every``-th decision may try the least-used shape that could still beat the best if
its estimate were higher by an optimism of ``1 / sqrt(1 + its forwards)`` tokens, when the budget
(``explore_fraction`` = 5% of the chosen steps' cost, accumulated) covers that shape's step (holding
an explored shape for a run of 8 decisions measured worse on SmolLM2 in float32: docs/decoding.md).

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
COMPILED_CANDIDATES = (0, 2)  # with the compiled block sizes: 6 graphs per state
RECENT_TIMES = 32  # decode steps per shape whose wall time corrects its measured cost
MEASURED_WEIGHT = 3  # the measured cost weighs as this many timed decode steps
TIMED_STEPS = 2  # rounds over the shapes, after one warm-up round
CALIBRATION_PRIOR = 4.0  # expected tokens of pseudo-observations at ratio 1 (ShapePolicy.calibration)


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
    """{shape: seconds per step}: ``run_step(shape)`` once each to warm up, then :data:`TIMED_STEPS`
    rounds over every shape (interleaved, so that load which comes and goes falls on all shapes alike),
    each step on the same snapshot of the state, restored after; a shape's cost is its median, made
    non-decreasing in the tokens a step carries (:func:`monotone_costs`: timing noise must not make a
    wider step look cheaper than a narrower one)."""
    times = {shape: [] for shape in shapes}
    saved = snapshot()
    try:
        for timed in range(TIMED_STEPS + 1):
            for shape in shapes:
                restore(saved)
                started = time.perf_counter()
                run_step(shape)
                sync()
                if timed:
                    times[shape].append(time.perf_counter() - started)
    finally:
        restore(saved)
    return monotone_costs({shape: sorted(t)[len(t) // 2] for shape, t in times.items()})


def monotone_costs(costs: dict) -> dict:
    """The least-squares fit of ``costs`` that is non-decreasing in (tokens, candidates) per step (pool
    adjacent violators): a step over more tokens costs at least as much as one over fewer."""
    order = sorted(costs, key=lambda s: (s.tokens, s.candidates, s.block))
    blocks: list[list] = []  # [sum, count, shapes]
    for shape in order:
        blocks.append([costs[shape], 1, [shape]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count, members = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
            blocks[-1][2] += members
    return {shape: total / count for total, count, members in blocks for shape in members}


class ShapePolicy:
    """The per-step choice (see the module docstring).

    Statistics are kept per draft context (:func:`jacobi_engine.guesses.draft_context`: how many tokens
    the guess strategy drafted for a row's next block), so that a step is sized by the drafts its rows
    hold: a row with a long n-gram draft is worth a wide block, one without is often worth one slot.
    A context's estimates lean on the statistics of all contexts until it has its own (``pooled_weight``
    pseudo-observations).

    ``observe(shape, delta)`` adds what the steps run with ``shape`` since the last sync verified (the
    delta of the state's histogram: ``delta[c][a]`` = (row, forward) pairs in context ``c`` that newly
    verified ``a`` tokens; a flat list is context 0); ``choose(contexts)`` returns the shape of the next
    steps for rows in those contexts (a count per context, or None for one row in context 0).
    :meth:`carried` starts the next call from this one's statistics, down-weighted.
    """

    def __init__(
        self,
        shapes,
        costs: dict,
        explore_every: int = 8,
        prior_steps: float = 4.0,
        explore_fraction: float = 0.05,
        pooled_weight: float = 4.0,
        learn_costs: bool = True,
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
        self.pooled_weight = pooled_weight
        self.widest = max(shape.block for shape in self.shapes)
        # Per context c (None: all contexts pooled): (row, forward) pairs and tokens per shape; per j,
        # pairs that verified >= j tokens among plain blocks with >= j slots, and those pairs.
        self.steps: dict = {}
        self.tokens: dict = {}
        self.reached: dict = {}
        self.tried: dict = {}
        self.decisions = 0
        self.chosen: dict[Shape, int] = {shape: 0 for shape in self.shapes}  # this call's decisions
        self.call_steps: dict[Shape, int] = {shape: 0 for shape in self.shapes}  # this call's (row, forward) pairs
        self.call_tokens: dict[Shape, int] = {shape: 0 for shape in self.shapes}
        # Until the next observation: per context, [S(0), ..., S(widest)] and its prefix sums; the lift.
        self._survival: dict = {}
        self._sums: dict = {}
        self._lift: float | None = None
        # Step times seen while decoding (the last RECENT_TIMES per shape): with the cost model's own
        # measurement, they give the cost the choice divides by (:meth:`cost`).
        self.timed: dict[Shape, list[float]] = {shape: [] for shape in self.shapes}
        self._cost: dict[Shape, float] = {}  # cost(shape) until its next timed step
        # The wall time of the last RECENT_TIMES switches of the active shape, widening and narrowing apart
        # (a widening fills the new slots: the kept tail, fresh guesses, the rows' drafts): the next step
        # of another shape than the current one pays it on top (:meth:`step_cost`).
        self.switch_times: dict[bool, list[float]] = {True: [], False: []}
        self.current: Shape | None = None  # the shape chosen last
        # Held calibration: per plain shape, tokens verified by its steps that continued a run of it, and
        # what the survival model expected of them when it was chosen (see :meth:`calibration`).
        self.held_tokens: dict[Shape, float] = {}
        self.held_expected: dict[Shape, float] = {}
        self.pending: tuple | None = None  # (shape, continued a run, expected tokens per row) of the last decision
        # Off for a seeded sampling call: its draws depend on the shapes it runs, which must not then
        # depend on wall time.
        self.learn_costs = learn_costs

    def _counts(self, table: dict, context) -> dict:
        return table.setdefault(context, {})

    def observe(self, shape: Shape, delta) -> None:
        rows = delta if delta and isinstance(delta[0], (list, tuple)) else [delta]
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == shape and pending[1] and not shape.candidates:
            pairs = sum(sum(histogram[1:]) for histogram in rows)
            if pairs > 0:
                tokens = sum(a * count for histogram in rows for a, count in enumerate(histogram))
                self.held_tokens[shape] = self.held_tokens.get(shape, 0.0) + tokens
                self.held_expected[shape] = self.held_expected.get(shape, 0.0) + pairs * pending[2]
        for context, histogram in enumerate(rows):
            self._observe(shape, context, histogram)

    def _observe(self, shape: Shape, context: int, delta) -> None:
        pairs = sum(delta[1:])
        if pairs <= 0:
            return
        self._survival.clear()
        self._sums.clear()
        self._lift = None
        tokens = sum(a * count for a, count in enumerate(delta))
        self.call_steps[shape] += pairs
        self.call_tokens[shape] += tokens
        for c in (context, None):
            steps, totals = self._counts(self.steps, c), self._counts(self.tokens, c)
            steps[shape] = steps.get(shape, 0) + pairs
            totals[shape] = totals.get(shape, 0) + tokens
            if shape.candidates == 0:
                reached, tried = self._counts(self.reached, c), self._counts(self.tried, c)
                at_least = 0
                for j in range(len(delta) - 1, 0, -1):
                    at_least += delta[j]
                    if j <= shape.block:
                        reached[j] = reached.get(j, 0) + at_least
                        tried[j] = tried.get(j, 0) + pairs

    def observe_seconds(self, shape: Shape, seconds: float) -> None:
        """A decode step of ``shape`` took ``seconds`` (wall time between host syncs, per step)."""
        if not self.learn_costs:
            return
        times = self.timed[shape]
        times.append(seconds)
        del times[:-RECENT_TIMES]
        self._cost.pop(shape, None)

    def observe_switch(self, source: Shape, target: Shape, seconds: float) -> None:
        """Changing the active shape from ``source`` to ``target`` took ``seconds`` (host wall time)."""
        if not self.learn_costs or source == target:
            return
        times = self.switch_times[target.block > source.block]
        times.append(seconds)
        del times[:-RECENT_TIMES]

    def switch_cost(self, shape: Shape) -> float:
        """Seconds to make ``shape`` active after the current one: the median of recent switches alike."""
        if self.current is None or shape == self.current:
            return 0.0
        times = self.switch_times[shape.block > self.current.block]
        return sorted(times)[len(times) // 2] if times else 0.0

    def step_cost(self, shape: Shape) -> float:
        """The next step's seconds with ``shape``: its cost, and the switch to it."""
        return self.cost(shape) + self.switch_cost(shape)

    def cost(self, shape: Shape) -> float:
        """Seconds per step of ``shape``: the median of its measured cost (weighing as
        :data:`MEASURED_WEIGHT` steps) and the steps of it timed while decoding. The cost model's
        timing, a few steps on one state, is noisy under load and sees the first call's cache length
        only; the steps a call runs correct it where it matters, the shapes it chooses."""
        cost = self._cost.get(shape)
        if cost is None:
            times = self.timed[shape]
            values = sorted(times + [self.costs[shape]] * MEASURED_WEIGHT)
            cost = self._cost[shape] = values[len(values) // 2]
        return cost

    def carried(self, decay: float = 0.5) -> ShapePolicy:
        """A policy for the next call of the same shapes and costs that starts from this one's statistics,
        each count multiplied by ``decay`` (so they weigh less than the new call's own as it goes)."""
        new = ShapePolicy(
            self.shapes, self.costs, self.explore_every, self.prior_steps, self.explore_fraction, self.pooled_weight
        )
        for name in ("steps", "tokens", "reached", "tried"):
            table = getattr(self, name)
            setattr(
                new, name, {c: {key: value * decay for key, value in counts.items()} for c, counts in table.items()}
            )
        new.timed = {shape: list(times) for shape, times in self.timed.items()}
        new.switch_times = {widening: list(times) for widening, times in self.switch_times.items()}
        new.held_tokens = {shape: value * decay for shape, value in self.held_tokens.items()}
        new.held_expected = {shape: value * decay for shape, value in self.held_expected.items()}
        new.budget = min(self.budget, new.budget)
        new.decisions = self.decisions
        return new

    # -- estimates ---------------------------------------------------------------------------
    def survival(self, j: int, context=None) -> float:
        """P(a forward verifies >= j tokens) in ``context`` (None: all): observed where blocks were that
        wide (shrunk towards all contexts' value), else extrapolated from the widest seen."""
        if j <= 1:
            return 1.0
        curve = self._survival.get(context)
        if curve is None:
            curve = self._survival[context] = self._curve(context)
        return curve[min(j, len(curve) - 1)]

    def _curve(self, context) -> list[float]:
        pooled = None if context is None else [self.survival(j) for j in range(self.widest + 1)]
        reached, tried = self.reached.get(context, {}), self.tried.get(context, {})
        curve = [1.0, 1.0]
        last = None  # the widest j with observations (here or, for a context, in the pool)
        for j in range(2, self.widest + 1):
            seen = tried.get(j, 0)
            if pooled is None:
                value = (reached.get(j, 0) + 0.5) / (seen + 1.0) if seen > 0 else None
            elif seen > 0 or self.tried.get(None, {}).get(j, 0) > 0:
                m = self.pooled_weight
                value = (reached.get(j, 0) + m * pooled[j]) / (seen + m)
            else:
                value = None
            if value is None:
                if last is None:
                    value = 0.5 ** (j - 1)  # nothing seen yet: a modest prior, explored soon anyway
                else:
                    hazard = min(0.95, curve[last] / max(curve[last - 1], 1e-9)) if last > 1 else 0.5
                    value = curve[last] * hazard ** (j - last)
            else:
                last = j
                value = min(value, curve[j - 1])  # survival never grows with j
            curve.append(value)
        return curve

    def block_estimate(self, block: int, context=None) -> float:
        """Expected tokens verified by a plain block of ``block`` slots: ``sum_{j <= block} S(j)``."""
        if context not in self._sums:
            sums = [0.0]
            for j in range(1, self.widest + 1):
                sums.append(sums[-1] + self.survival(j, context))
            self._sums[context] = sums
        return self._sums[context][min(block, self.widest)]

    def lift(self) -> float:
        """Tokens per forward of candidate shapes over their blocks' plain estimate, observed so far."""
        steps, tokens = self.steps.get(None, {}), self.tokens.get(None, {})
        if self._lift is None:
            observed = [s for s in self.shapes if s.candidates and steps.get(s, 0) > 0]
            ratios = [tokens[s] / steps[s] / self.block_estimate(s.block) for s in observed]
            self._lift = max(1.0, sum(ratios) / len(ratios)) if ratios else 1.2
        return self._lift

    def estimate(self, shape: Shape, context=None) -> float:
        """Expected tokens verified per (row, forward) in ``context``. A plain block: the survival model's,
        which pools every width's forwards (a block's first ``j`` slots verify as a ``j``-slot block's
        would), so it does not chase the noise of one width's few forwards. With candidates: the shape's
        own mean there, blended with its block's estimate times the candidates' lift."""
        prior = self.block_estimate(shape.block, context)
        if not shape.candidates:
            return min(prior * self.calibration(shape), float(shape.block))
        prior = min(prior * self.lift(), shape.block + shape.candidate_len)
        steps = self.steps.get(context, {}).get(shape, 0)
        tokens = self.tokens.get(context, {}).get(shape, 0)
        return (tokens + self.prior_steps * prior) / (steps + self.prior_steps)

    def calibration(self, shape: Shape) -> float:
        """Tokens a plain ``shape`` verified on the steps that continued a run of it, over what the survival
        model expected of them when they were chosen (shrunk towards 1 by :data:`CALIBRATION_PRIOR`).

        The survival model pools every width's forwards, each as if its block started afresh; a block
        held for several steps also converges its far slots for the steps after, so a wide block that is
        kept verifies more than its first steps suggest, and a narrow one held where wide ones were
        measured less. The ratio, measured on held steps only, credits each shape's estimate for that
        (never below 1): the choice is scored by what a shape does over a run, not by its next step alone."""
        expected = self.held_expected.get(shape, 0.0)
        ratio = (self.held_tokens.get(shape, 0.0) + CALIBRATION_PRIOR) / (expected + CALIBRATION_PRIOR)
        # A credit only: the shapes a call chooses are those whose estimate came out high (the winner's
        # curse), so their held steps fall short of it on average whether or not holding helps; marking
        # them down for that pushed the choice onto shapes measured less (SmolLM2 in float32 moved from
        # 4-slot blocks to 2-slot ones, and below greedy).
        return max(1.0, ratio)

    def forwards(self, shape: Shape, context=None) -> float:
        return self.steps.get(context, {}).get(shape, 0)

    def score(self, shape: Shape, contexts=None) -> float:
        """Expected tokens per second of the next step with ``shape``, for rows in ``contexts``."""
        return sum(rows * self.estimate(shape, c) for c, rows in _rows(contexts)) / self.step_cost(shape)

    # -- the choice ----------------------------------------------------------------------------
    def optimism(self, shape: Shape, context=None) -> float:
        """How many more tokens per forward ``shape`` might give than estimated in ``context``: one untried,
        shrinking as it is tried (1 / sqrt(1 + forwards))."""
        return 1.0 / math.sqrt(1.0 + self.forwards(shape, context))

    def choose(self, contexts=None) -> Shape:
        """The shape of the next steps for rows in ``contexts`` ({context: rows}, a list of rows per
        context, or None: one row in context 0)."""
        rows = _rows(contexts)
        self.decisions += 1
        best = max(self.shapes, key=lambda s: self.score(s, rows))
        self.budget += self.explore_fraction * self.cost(best)
        if self.explore_every and self.decisions % self.explore_every == 0:
            best_score = self.score(best, rows)

            def hopeful(s):
                gain = sum(n * (self.estimate(s, c) + self.optimism(s, c)) for c, n in rows)
                return gain / self.step_cost(s) >= best_score

            candidates = [
                s for s in self.shapes if s != best and s.block > 1 and self.cost(s) <= self.budget and hopeful(s)
            ]
            if candidates:
                best = min(candidates, key=lambda s: (sum(self.forwards(s, c) for c, _ in rows), s))
                self.budget -= self.cost(best)
        return self._chosen(best, rows)

    def _chosen(self, shape: Shape, rows) -> Shape:
        continued = shape == self.current
        if not shape.candidates:
            # What the survival model expects per row of the steps about to run (for the calibration).
            pairs = sum(n for _, n in rows)
            expected = sum(n * self.block_estimate(shape.block, c) for c, n in rows) / pairs
            self.pending = (shape, continued, expected)
        self.chosen[shape] += 1
        self.current = shape
        return shape

    def summary(self) -> dict:
        """This call's use of each shape (not the statistics carried from earlier calls)."""
        steps, tokens = self.call_steps, self.call_tokens
        return {
            str(s): dict(
                decisions=self.chosen[s],
                forwards=steps[s],
                tokens_per_forward=None if not steps[s] else tokens[s] / steps[s],
                seconds_per_step=self.cost(s),
                measured_seconds_per_step=self.costs[s],
            )
            for s in self.shapes
        }


def _rows(contexts) -> list[tuple[int, float]]:
    """[(context, rows)] from {context: rows}, a sequence of per-context row counts, or None (one row, 0)."""
    if contexts is None:
        return [(0, 1)]
    if isinstance(contexts, list) and contexts and isinstance(contexts[0], tuple):
        return contexts
    items = contexts.items() if isinstance(contexts, dict) else enumerate(contexts)
    rows = [(c, n) for c, n in items if n]
    return rows or [(0, 1)]
