"""Running decode steps: one loop for eager steps and graph replays, capture and compile with their
fallback, the per-step choice of an adaptive engine, the host-side bounds, and the streamer.

It runs the engine's entries (:mod:`jacobi_engine.entries`: a state with one
:class:`~jacobi_engine.entries.Variant` per step shape it may run, each with its step config, its width
view of the state and, once set up, its compiled step and CUDA graph).

The loop syncs with the host once per ``sync_every`` steps: it reads whether every row is done, the
longest cache row and the longest token row (one small transfer, with the histogram of verified
tokens when the engine chooses its step shape), streams new tokens, lets the policy pick the next
shape and, between syncs, hands eager steps :class:`~jacobi_engine.step.StepBounds` derived from
those numbers (a compiled or captured step has static shapes and gets none).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable

import torch

from jacobi_engine import ops
from jacobi_engine.adaptive import CostModel, Shape, ShapePolicy, measure
from jacobi_engine.compile import (
    abandon_compiled,
    compile_step,
    compiled_steps,
    first_compiled_call,
    is_step_compile_error,
)
from jacobi_engine.entries import Entry, Variant
from jacobi_engine.guesses import refine_guesses
from jacobi_engine.prefill import ModelForward
from jacobi_engine.state import StepState
from jacobi_engine.step import StepBounds, catch_up_pool, decode_step


class Stream:
    """The streamer of a call (transformers' ``put``/``end`` protocol), batch size 1, fed from row 0."""

    def __init__(self, streamer, streamed: int = 0):
        self.streamer, self.streamed = streamer, streamed

    def put(self, tokens: torch.Tensor) -> None:
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())

    def advance(self, state: StepState, known: int) -> None:
        if self.streamer is not None and known > self.streamed:
            self.streamer.put(state.tokens[0, self.streamed : known].cpu())
            self.streamed = known

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()

    @property
    def active(self) -> bool:
        return self.streamer is not None


class Runner:
    """Steps, compiles, captures and times the entries of one engine.

    ``step_watcher`` (see :meth:`jacobi_engine.JacobiEngine.watch_steps`) wraps every eager step,
    for tests and profiling.
    """

    def __init__(self, model, advance: int, tree_tokens: int, sync_every: int):
        self.model = model
        self.advance = advance  # the most tokens one step commits
        self.tree_tokens = tree_tokens  # the most tokens one step appends to the cache
        self.sync_every = sync_every
        self.step_watcher: Callable | None = None
        # The last greedy call's choice per (batch size, shapes): the next call's prior.
        self.policies: dict[tuple, ShapePolicy] = {}

    @contextlib.contextmanager
    def watching(self, watcher: Callable):
        """``watcher(entry, run_step)`` wraps every eager step inside this context (``step_watcher``)."""
        previous, self.step_watcher = self.step_watcher, watcher
        try:
            yield
        finally:
            self.step_watcher = previous

    # -- one step -------------------------------------------------------------------------------
    def step(self, entry: Entry, bounds: StepBounds | None) -> None:
        variant = entry.variant
        if self.step_watcher is not None:
            self.step_watcher(entry, lambda: self._step(entry, variant, bounds))
            return
        self._step(entry, variant, bounds)

    def _step(self, entry: Entry, variant: Variant, bounds: StepBounds | None) -> None:
        if variant.compiled is not None:
            try:
                # A step that would recompile raises instead (compile.compiled_steps): a graph that needs a
                # new compile at every step (a forward hook counting calls in a Python attribute, which
                # dynamo bakes in and guards on) is worse than eager.
                variant.compiled(variant.state)
                return
            except Exception as error:
                if not is_step_compile_error(error):  # raised while compiling, before the step ran
                    raise
                variant.compiled, variant.compile_failed = None, abandon_compiled(error, self.model)
        decode_step(entry.forward, variant.config, variant.state, bounds)

    # -- set-up ------------------------------------------------------------------------------------
    def compile(self, entry: Entry) -> float:
        """Compiles every variant's step (once per variant); returns the seconds it took (0 if done before)."""
        return sum(self._compile(variant, entry.forward) for variant in entry.variants.values())

    def _compile(self, variant: Variant, forward: ModelForward) -> float:
        if variant.compiled is not None or variant.compile_failed is not None:
            return 0.0
        if variant.config.sampling is not None and variant.config.candidates:
            # Not verified: the compiled tree sampling step drew other tokens than the eager one with
            # top-k in one test, and whether that is rounding in the warpers was not established.
            variant.compile_failed = "sampling with candidates is decoded eagerly (compile=True does not cover it yet)"
            warnings.warn(
                f"compile=True: {variant.compile_failed}; its tokens follow the exact sampling rule as in eager mode",
                RuntimeWarning,
                stacklevel=5,
            )
            return 0.0
        compiled = compile_step(forward, variant.config, tag=f"{id(variant):x}")
        variant.compiled, seconds, variant.compile_failed = first_compiled_call(compiled, variant.state, self.model)
        return seconds

    def capture(self, entry: Entry) -> float:
        """Captures every variant's step in a CUDA graph (once per variant), on the model's device;
        returns the seconds it took.

        The warm-up steps (they also JIT-compile Triton kernels) run on a snapshot of the state, which
        is then restored, so set-up never advances decoding; the K/V they wrote lie past the committed
        lengths and are overwritten like any rejected guess.
        """
        started = time.perf_counter()
        done_before = all(variant.graph is not None for variant in entry.variants.values())
        with torch.cuda.device(entry.state.key.device):
            for variant in entry.variants.values():
                if variant.graph is not None:
                    continue
                state = variant.state
                snapshot = state.snapshot()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), compiled_steps(variant.compiled is not None):
                    for _ in range(2):
                        self._step(entry, variant, None)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), compiled_steps(variant.compiled is not None):
                    self._step(entry, variant, None)
                state.restore(snapshot)
                torch.cuda.synchronize()
                variant.graph = graph
        return 0.0 if done_before else time.perf_counter() - started

    def measure_costs(self, entry: Entry, shapes) -> dict:
        """{shape: seconds per step} of ``shapes``, timed on a snapshot of the entry's state (restored)."""
        state = entry.state
        device = state.key.device
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        active = entry.active

        span = entry.pool_span

        def run_step(shape):
            self.switch(entry, shape)
            variant = entry.variant
            with compiled_steps(variant.compiled is not None):
                if variant.graph is not None:
                    variant.graph.replay()
                else:
                    self._step(entry, variant, None)
            self._count_pool_span(entry, 1)

        def snapshot():
            # Every width view's own buffers too: measuring runs steps on them.
            views = [v.state for v in entry.variants.values() if v.state is not state]
            return state.snapshot() + [(t, t.clone()) for view in views for t in _own_tensors(view, state)]

        def restore(saved):
            StepState.restore(saved)
            entry.pool_span = span

        costs = measure(run_step, snapshot, restore, shapes, sync)
        entry.active = active
        return costs

    # -- the per-step choice -----------------------------------------------------------------------
    def start_policy(self, entry: Entry, cost_model: CostModel | None, carry: bool = True) -> float:
        """The per-step choice for a call (adaptive engines): times the shapes the cost model lacks for
        this batch size, on the entry's prefilled state; returns the seconds it took. With ``carry`` the
        choice starts from the entry's last call's statistics (down-weighted, :meth:`ShapePolicy.carried`),
        so each call does not explore anew; without, from nothing (a seeded sampling call, whose draws
        depend on the shapes run, then repeats whatever ran before it; nor does it correct the costs by
        its steps' wall time)."""
        if not entry.adaptive:
            return 0.0
        started = time.perf_counter()
        batch, shapes = entry.key.batch, list(entry.variants)
        missing = cost_model.missing(batch, shapes)
        if missing:
            for shape, seconds in self.measure_costs(entry, missing).items():
                cost_model.seconds[(batch, shape)] = seconds
            cost_model.cache_length[batch] = int(entry.state.cache.cache_seqlens.max())
        costs = {shape: cost_model.cost(batch, shape) for shape in shapes}
        key = (batch, tuple(sorted(shapes)))
        previous = self.policies.get(key) if carry else None
        if previous is not None and previous.costs == costs:
            entry.policy = previous.carried()  # the last call's statistics, down-weighted, as the prior
        else:
            entry.policy = ShapePolicy(shapes, costs, learn_costs=carry)
        if carry:
            self.policies[key] = entry.policy
        entry.histogram = entry.state.histogram.view(-1).tolist()
        entry.left_lengths.clear()  # the last call's tails
        self.switch(entry, entry.policy.choose(self._contexts(entry.state)))
        return time.perf_counter() - started if missing else 0.0

    def switch(self, entry: Entry, shape: Shape, known: int | None = None) -> None:
        """Makes ``shape`` the entry's active variant, carrying the block over: a narrower block drops the
        last guesses; a wider one's new slots take what that block held when it was last left, shifted
        by the tokens committed since (:func:`shifted_tail`), else fresh guesses, and then the rest of
        the rows' drafts where the strategy drafts (looked up in the first ``known`` token columns, the
        longest row at the sync just made, when given)."""
        if shape == entry.active:
            return
        source, target = entry.variant.state, entry.variants[shape].state
        if source.block is not target.block:
            width = min(source.block.shape[1], target.block.shape[1])
            slots = target.block.shape[1]
            if slots > width:
                fresh = source.guesses.fill()[:, width:slots]
                left = entry.left_lengths.get(shape)
                if left is not None:
                    # The wider block's slots past ``width`` still hold what it predicted when it was last
                    # left: shifted by the tokens committed since, they are better guesses than fresh ones
                    # (a fresh tail restarts the convergence a wide block builds up over its steps).
                    fresh = shifted_tail(target.block, source.lengths - left, width, fresh)
                target.block[:, width:] = fresh
            target.block[:, :width] = source.block[:, :width]
            if slots > width and source.guesses.draft_lengths() is not None:
                # The new slots take the rest of the rows' drafts (the narrower block held a prefix).
                refine_guesses(source.guesses, target.block, source.lengths, ~source.done, known)
            if target.draft_sampled is not None:
                target.draft_sampled[:, :width] = source.draft_sampled[:, :width]
                target.draft_sampled[:, width:] = False
                target.proposal[:, :width] = source.proposal[:, :width]
        if shape.candidates and entry.pool_span:
            # Plain steps leave the pool alone; the first step that looks candidates up needs their output.
            catch_up_pool(target, entry.pool_span)
            entry.pool_span = 0
        entry.left_lengths[entry.active] = source.lengths.clone()
        entry.active = shape

    @staticmethod
    def _count_pool_span(entry: Entry, steps: int) -> None:
        """After ``steps`` steps of the active shape: a plain step commits at most its block's tokens
        without feeding the pool; a step with candidates feeds it everything committed."""
        if entry.state.pool is None:
            return
        shape = entry.active
        entry.pool_span = 0 if shape.candidates else entry.pool_span + steps * shape.block

    def widest(self, entry: Entry) -> Shape:
        return max(entry.variants, key=lambda shape: (shape.block, shape.candidates))

    def to_primary(self, entry: Entry, carry: bool) -> None:
        """Makes the widest shape (the state itself, which prefill writes) active; ``carry`` keeps the
        running rows' blocks (a request joining a running batch), else they are about to be rewritten."""
        if carry:
            self.switch(entry, self.widest(entry))
        else:
            entry.active = self.widest(entry)
            entry.pool_span = 0  # every row's prefill seeds its pool up to its length
        entry.left_lengths.clear()  # a (re)started row's old tails belong to another request

    def _choose(self, entry: Entry, histogram: list[int], contexts: list[int], done: list[int], known: int) -> None:
        delta = [now - before for now, before in zip(histogram, entry.histogram)]
        entry.histogram = histogram
        slots = entry.state.histogram.shape[1]
        policy, source = entry.policy, entry.active
        policy.observe(source, [delta[c : c + slots] for c in range(0, len(delta), slots)])
        shape = policy.choose(_active_contexts(contexts, done))
        started = time.perf_counter()
        self.switch(entry, shape, known)
        policy.observe_switch(source, shape, time.perf_counter() - started)

    @staticmethod
    def _contexts(state: StepState) -> dict:
        """{draft context: active rows} of the state (a host read: at the start of a call only)."""
        return _active_contexts(state.context.tolist(), state.done.tolist())

    # -- the loop ----------------------------------------------------------------------------------
    def sync(self, entry: Entry, timed: tuple | None = None) -> tuple[int, int, int]:
        """(every row done, the longest cache row, the longest token row) in one host transfer, with the
        ops' error word (a bad value some op clamped raises here, naming it); an adaptive entry also reads
        the histogram in it and chooses the next steps' shape. ``timed`` = (shape, steps, started) of the
        steps run since the last sync gives the policy their wall time (up to this read)."""
        state = entry.state
        values = [
            state.done.all().to(torch.long),
            state.cache.cache_seqlens.max().long(),
            state.lengths.max().long(),
            state.errors[0].long(),
        ]
        stacked = torch.stack(values)
        pool_span = entry.policy is not None and state.pool is not None
        if entry.policy is not None:
            # The choice reads the histogram by draft context, and each row's context and done flag (and
            # how far the pool lags behind the output), in the same transfer.
            parts = [stacked, state.histogram.view(-1), state.context, state.done.long()]
            if pool_span:
                parts.append((state.lengths.long() - state.pool.fed).max()[None])
            stacked = torch.cat(parts)
        read = stacked.tolist()
        if pool_span:
            entry.pool_span = max(0, read.pop())
        if timed is not None and entry.policy is not None:
            shape, steps, started = timed
            entry.policy.observe_seconds(shape, (time.perf_counter() - started) / steps)
        finished, longest, known, errors = read[:4]
        ops.check_error_word(errors, state.errors)
        if entry.policy is not None and not finished:
            batch, cells = state.key.batch, state.histogram.numel()
            histogram, contexts = read[4 : 4 + cells], read[4 + cells : 4 + cells + batch]
            self._choose(entry, histogram, contexts, read[4 + cells + batch :], known)
        return finished, longest, known

    def run_until_done(self, entry: Entry, max_steps: int, stream: Stream) -> None:
        """Steps (or replays the graph) until every row is done, syncing once per ``sync_every`` steps."""
        sync_every = 1 if stream.active else self.sync_every
        taken = 0
        timed = None  # the steps since the last sync: their shape, count and start
        while True:
            finished, longest, known = self.sync(entry, timed)
            stream.advance(entry.state, known)
            if finished:
                return
            if taken >= max_steps:  # pragma: no cover
                raise RuntimeError("Jacobi decoding did not finish within its step bound; this is a bug")
            steps = min(sync_every, max_steps - taken)
            timed = (entry.active, steps, time.perf_counter())
            self.run_steps(entry, steps, longest, known)
            taken += steps

    def run_steps(self, entry: Entry, steps: int, longest: int, known: int) -> None:
        """``steps`` decode steps (or graph replays) of the active variant after a sync that read ``longest``
        (the longest cache row) and ``known`` (the longest token row)."""
        variant = entry.variant
        stack = contextlib.ExitStack()
        with stack:
            stack.enter_context(compiled_steps(variant.compiled is not None))
            if variant.graph is not None:
                stack.enter_context(torch.cuda.device(entry.state.key.device))
                for _ in range(steps):
                    variant.graph.replay()
                self._count_pool_span(entry, steps)
                return
            bounds = None
            if variant.compiled is None:
                # Each step commits at most one verified row and appends the whole token tree; the bounds
                # must hold until the next sync.
                bounds = StepBounds(
                    kv_len=longest + self.advance * (steps - 1) + self.tree_tokens,
                    known_columns=known + self.advance * steps,
                )
            for _ in range(steps):
                self.step(entry, bounds)
        self._count_pool_span(entry, steps)


def shifted_tail(stale: torch.Tensor, shift: torch.Tensor, width: int, fresh: torch.Tensor) -> torch.Tensor:
    """Guesses for slots ``width:`` of a block that was left ``shift[b]`` committed tokens ago (per row):
    slot ``i`` takes the stale block's slot ``i + shift`` (the same position of the sequence) where that
    slot exists, else ``fresh`` (a [B, slots - width] tensor); a row whose shift is negative (it was
    restarted since) takes ``fresh`` whole."""
    slots = stale.shape[1]
    shift = shift.to(torch.long)
    index = torch.arange(width, slots, device=stale.device)[None, :] + shift[:, None]
    carried = stale.gather(1, index.clamp(min=0, max=slots - 1))
    keep = (index < slots) & (shift >= 0)[:, None]
    return torch.where(keep, carried, fresh)


def _active_contexts(contexts: list[int], done: list) -> dict:
    """{draft context: rows} over the rows not done."""
    rows: dict[int, int] = {}
    for context, finished in zip(contexts, done):
        if not finished:
            rows[context] = rows.get(context, 0) + 1
    return rows


def _own_tensors(view: StepState, primary: StepState) -> list[torch.Tensor]:
    """The tensors of a width view that it does not share with the primary state."""
    shared = {id(t) for t in vars(primary).values() if isinstance(t, torch.Tensor)}
    return [t for t in vars(view).values() if isinstance(t, torch.Tensor) and id(t) not in shared]
