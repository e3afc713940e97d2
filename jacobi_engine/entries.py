"""The engine's cached states and what runs on them: :class:`Entry` and its :class:`Variant` s, the
:class:`StateCache` that keeps them, and how an entry is made from a :class:`~jacobi_engine.state.StateKey`.

Each :class:`Entry` is one state (:mod:`jacobi_engine.state`) with what runs on it: its forward
context and model forward, and one :class:`Variant` per step shape it may run (a fixed engine has one;
``block_size="auto"`` has a few, :mod:`jacobi_engine.adaptive`), each with its step config, its width
view of the state and, once set up, its compiled step and CUDA graph. The :class:`StateCache` keeps the
last ``max_cached_states`` entries (LRU) so that calls with the same key reuse them (gpt-fast's
pattern: a graph captured once per key is replayed by every later call); ``clear()`` frees them.
:mod:`jacobi_engine.runner` steps, compiles and captures them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from jacobi_engine import ops
from jacobi_engine.adaptive import Shape, ShapePolicy
from jacobi_engine.config import EngineConfig
from jacobi_engine.context import ForwardContext
from jacobi_engine.generation import GenerationSettings
from jacobi_engine.guesses import GuessStrategy
from jacobi_engine.hf_compat import ModelInfo, model_device
from jacobi_engine.pool import tree_layout
from jacobi_engine.prefill import ModelForward
from jacobi_engine.processors import LogitsProcessing
from jacobi_engine.state import StateKey, StepState, allocate
from jacobi_engine.step import StepConfig


@dataclass
class Variant:
    """One step shape of an entry: its config, its width view of the state, its compiled step and graph."""

    shape: Shape
    state: StepState
    config: StepConfig
    graph: object | None = None  # torch.cuda.CUDAGraph once captured
    compiled: Callable | None = None  # the torch.compile'd step (compile=True), once compiled
    compile_failed: str | None = None  # why the step could not be compiled (then it runs eagerly)


@dataclass
class Entry:
    """One cached state and what runs on it (``state`` is the widest view; the others share its buffers)."""

    key: StateKey
    state: StepState
    context: ForwardContext
    forward: ModelForward
    variants: dict[Shape, Variant]
    active: Shape
    policy: ShapePolicy | None = None  # the running choice of an adaptive engine's call
    histogram: list[int] = field(default_factory=list)  # at the last sync
    left_lengths: dict = field(default_factory=dict)  # shape -> the rows' lengths when it was last left
    # At least max(lengths - pool.fed): output tokens that plain steps committed and the candidate pool
    # has not learned yet (a shape with candidates catches up first, jacobi_engine.step.catch_up_pool).
    pool_span: int = 0

    @property
    def variant(self) -> Variant:
        return self.variants[self.active]

    # The active variant's set-up, as a fixed engine's single entry exposes it.
    @property
    def config(self) -> StepConfig:
        return self.variant.config

    @property
    def compiled(self):
        return self.variant.compiled

    @property
    def compile_failed(self):
        return self.variant.compile_failed

    @property
    def graph(self):
        return self.variant.graph

    @property
    def adaptive(self) -> bool:
        return len(self.variants) > 1


class StateCache:
    """The last ``max_states`` entries, least recently used first out."""

    def __init__(self, max_states: int):
        self.max_states = max_states
        self._entries: OrderedDict[StateKey, Entry] = OrderedDict()

    def get(self, key: StateKey, create: Callable[[], Entry]) -> Entry:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        # Evict before allocating, so a new state never coexists with more than max_states - 1 others.
        while len(self._entries) >= self.max_states:
            self._entries.popitem(last=False)
        entry = self._entries[key] = create()
        return entry

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()

    @property
    def nbytes(self) -> int:
        return sum(entry.state.nbytes for entry in self._entries.values())


def entry_key(
    config: EngineConfig,
    settings: GenerationSettings,
    model: torch.nn.Module,
    info: ModelInfo,
    *,
    batch: int,
    capacity: int,
    logging: bool,
) -> StateKey:
    """The key of the state that serves ``batch`` rows of ``capacity`` cache rows with ``settings`` (a call
    of ``generate``, or a scheduler's batch) on an engine with ``config``; ``logging``: record trajectories."""
    return StateKey(
        batch=batch,
        capacity=capacity,
        block_size=config.max_block_size,
        chunked=config.mode == "chunked",
        candidates=config.max_candidates,
        candidate_len=config.candidate_len,
        eos_slots=max(4, len(settings.eos_ids)),
        processors=settings.processors if settings.processors.active else None,
        sampling=settings.sampling,
        logging=logging,
        vocab_size=info.vocab_size,
        device=model_device(model),
        dtype=next(model.parameters()).dtype,
    )


def new_entry(
    key: StateKey,
    model: torch.nn.Module,
    info: ModelInfo,
    config: EngineConfig,
    guess_strategy: GuessStrategy,
    verify_backend: str,
) -> Entry:
    """A new entry for ``key``: its state allocated, one variant per step shape of ``config`` (each with
    its step config and width view), its forward context and model forward; the widest shape active."""
    state = allocate(key, info.num_layers, guess_strategy, config.pool_buckets, config.pool_slots)
    processing = LogitsProcessing(key.processors, key.vocab_size, key.device) if key.processors else None
    variants = {}
    for shape in config.shapes():
        tree_mask = tree_depth = None
        if shape.candidates:
            tree_mask, tree_depth = tree_layout(shape.block, shape.candidates, shape.candidate_len, key.device)
        step_config = StepConfig(
            shape.block,
            key.chunked,
            verify_backend,
            processing,
            candidates=shape.candidates,
            candidate_len=shape.candidate_len,
            tree_mask=tree_mask,
            tree_depth=tree_depth,
            sampling=key.sampling,
            sampling_rule=config.sampling_rule,
            draft_contexts=config.adaptive,
        )
        variants[shape] = Variant(shape, state.view(shape.block, shape.candidates), step_config)
    widest = max(variants, key=lambda shape: (shape.block, shape.candidates))
    context = ForwardContext(state.cache, ops.resolve_attention_backend(config.attention_backend, key.device))
    return Entry(key, state, context, ModelForward(model, info, context), variants, widest)
