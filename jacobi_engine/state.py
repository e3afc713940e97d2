"""Decode state: :class:`StepState`, its key, allocation, per-call reset, snapshot and restore.

This is the only file that lists state fields. Each device buffer is declared once, as a field
with its shape, dtype, when it exists, whether a decode step mutates it (then it is part of a
snapshot) and whether every call zeroes it; :func:`allocate` and :meth:`StepState.snapshot` read
those declarations, so a new buffer is one line here.

A state is allocated per :class:`StateKey` (batch, capacity bucket, block, mode, candidates,
processors, sampling, ...) and reused by every later call with that key, so its tensors keep their
addresses: a CUDA graph captured on them, or a compiled step guarded on them, serves every call.
Per-request values (prompt width, limits, EOS ids) live in device tensors, never in Python numbers.

Token layout (HF's): ``tokens[b, :width]`` is the prompt exactly as passed (padding included);
generated token ``t`` sits at column ``width + t``; ``lengths[b]`` is one past row ``b``'s last
known token, ``limits[b] = width + max_new_tokens``. Block slot 0 is always
``tokens[b, lengths[b] - 1]``: known-correct, its K/V not yet in the cache.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from jacobi_engine.cache import JacobiCache
from jacobi_engine.generation import ProcessorSpec
from jacobi_engine.guesses import DRAFT_CONTEXTS, GuessStrategy
from jacobi_engine.pool import CandidatePool
from jacobi_engine.sampling import SamplingSpec

MIN_CAPACITY = 64


def capacity_bucket(needed: int) -> int:
    """Cache rows for a request needing ``needed``: the next power of two (at least 64), so that
    requests of similar length share one state (and one captured graph or compiled step)."""
    return max(MIN_CAPACITY, 1 << (needed - 1).bit_length())


@dataclass(frozen=True)
class StateKey:
    """What fixes the shapes and the traced behaviour of a state (hashable)."""

    batch: int
    capacity: int  # cache rows for prompt + new tokens (the tree's rows come on top)
    block_size: int
    chunked: bool
    candidates: int
    candidate_len: int
    eos_slots: int
    processors: ProcessorSpec | None
    sampling: SamplingSpec | None
    logging: bool
    vocab_size: int
    device: torch.device
    dtype: torch.dtype

    # -- sizes derived from the key, each written once ------------------------------------------
    @property
    def verified_width(self) -> int:
        """The longest row one step verifies: the block, or ``t0`` and a branch."""
        return max(self.block_size, self.candidate_len + 1) if self.candidates else self.block_size

    @property
    def tree_tokens(self) -> int:
        """Tokens per decode forward (and cache rows it appends): the block and every branch."""
        return self.block_size + self.candidates * self.candidate_len

    @property
    def width(self) -> int:
        """Token columns: prompt + new tokens, and one verified row of slack."""
        return self.capacity + max(self.block_size, self.candidate_len + 1)

    @property
    def max_steps(self) -> int:
        """A bound on the decode steps of a call: each verifies at least one token."""
        return self.capacity + self.block_size


def _buffer(
    shape: Callable[[StateKey], tuple],
    dtype=torch.long,
    *,
    when=None,
    mutable=False,
    reset=False,
    init=None,
    per_width=False,
):
    """A device buffer of the state: ``shape(key)``, zeros (or ``init(key)``) at allocation, present
    when ``when(key)``; ``mutable`` buffers are written by decode steps (and snapshotted); ``reset``
    ones are zeroed at the start of every call; ``per_width`` ones have a copy of their own in each
    width view of the state (:meth:`StepState.view`, for engines that choose the block per step)."""
    spec = dict(shape=shape, dtype=dtype, when=when, mutable=mutable, reset=reset, init=init, per_width=per_width)
    return field(default=None, metadata={"buffer": spec})


def _candidates(key: StateKey) -> bool:
    return key.candidates > 0


def _logging(key: StateKey) -> bool:
    return key.logging


def _sampling(key: StateKey) -> bool:
    return key.sampling is not None


@dataclass
class StepState:
    """Device state of the decode step. Shapes: B rows, n block slots, W token columns (see the module docstring)."""

    key: StateKey
    cache: JacobiCache
    guesses: GuessStrategy
    pool: CandidatePool | None  # n-gram candidates, when the engine verifies any
    # fmt: off
    tokens: torch.Tensor = _buffer(lambda k: (k.batch, k.width), mutable=True)  # int64, HF layout
    block: torch.Tensor = _buffer(lambda k: (k.batch, k.block_size), mutable=True, per_width=True)  # int64, slot 0 known-correct
    lengths: torch.Tensor = _buffer(lambda k: (k.batch,), torch.int32, mutable=True)  # one past the last known token
    limits: torch.Tensor = _buffer(lambda k: (k.batch,), torch.int32)  # width + max_new_tokens
    done: torch.Tensor = _buffer(lambda k: (k.batch,), torch.bool, mutable=True)
    eos_ids: torch.Tensor = _buffer(lambda k: (k.eos_slots,))  # int64, padded with -1 (never matches)
    position_limit: torch.Tensor = _buffer(lambda k: (k.batch,))  # int64, largest position id worth feeding
    pad_lengths: torch.Tensor = _buffer(lambda k: (k.batch,))  # int64, leading padding of each prompt
    prompt_widths: torch.Tensor = _buffer(lambda k: (k.batch,))  # int64, columns of each row's prompt (padding incl.)
    histogram: torch.Tensor = _buffer(lambda k: (DRAFT_CONTEXTS, k.verified_width + 1), mutable=True, reset=True)  # newly verified per (row, forward), by draft context
    context: torch.Tensor = _buffer(lambda k: (k.batch,), mutable=True)  # int64, each row's draft context (guesses.draft_context)
    verified_in_chunk: torch.Tensor = _buffer(lambda k: (k.batch,), torch.int32, mutable=True, reset=True)
    row_forwards: torch.Tensor = _buffer(lambda k: (k.batch,), torch.int32, mutable=True, reset=True)  # decode forwards per row
    lengths_before: torch.Tensor = _buffer(lambda k: (k.batch,), torch.int32)  # scratch of a step
    step: torch.Tensor = _buffer(lambda k: (1,), mutable=True, reset=True)  # int64, decode steps taken
    slot_offsets: torch.Tensor = _buffer(lambda k: (k.block_size,), init=lambda k: torch.arange(k.block_size), per_width=True)
    candidate_wins: torch.Tensor = _buffer(lambda k: (), mutable=True, reset=True)  # (row, forward) pairs a branch won
    verified_row: torch.Tensor = _buffer(lambda k: (k.batch, k.verified_width), when=_candidates, per_width=True)  # the row a pool step verifies
    log_blocks: torch.Tensor = _buffer(lambda k: (k.max_steps, k.batch, k.block_size), when=_logging)  # blocks fed
    log_lengths: torch.Tensor = _buffer(lambda k: (k.max_steps, k.batch), torch.int32, when=_logging)  # lengths before
    log_accepted: torch.Tensor = _buffer(lambda k: (k.max_steps, k.batch), torch.int32, when=_logging)  # 0: finished
    # Sampling (see jacobi_engine.sampling): the distribution each slot's draft was drawn from, whether it was
    # drawn from it (else deterministic), the Philox key and each row's counter word.
    proposal: torch.Tensor = _buffer(lambda k: (k.batch, k.block_size, k.vocab_size), torch.float32, when=_sampling, mutable=True, per_width=True)
    draft_sampled: torch.Tensor = _buffer(lambda k: (k.batch, k.block_size), torch.bool, when=_sampling, mutable=True, per_width=True)
    seed: torch.Tensor = _buffer(lambda k: (1,), when=_sampling)
    sequence_ids: torch.Tensor = _buffer(lambda k: (k.batch,), when=_sampling, init=lambda k: torch.arange(k.batch))
    # The ops' error word (ops.CommitTarget): bits set on the device by a bad value, checked at host syncs.
    errors: torch.Tensor = _buffer(lambda k: (1,), torch.int32, mutable=True, reset=True)
    # fmt: on

    def commit(self, chunked: bool):
        """The verify ops' :class:`~jacobi_engine.op_args.CommitTarget` over this state's tensors, built once
        per commit mode."""
        from jacobi_engine import ops

        targets = self.__dict__.setdefault("_commit_targets", {})
        if chunked not in targets:
            targets[chunked] = ops.CommitTarget(
                self.tokens,
                self.lengths,
                self.done,
                self.eos_ids,
                self.limits,
                self.cache.cache_seqlens,
                chunked,
                self.errors,
            )
        return targets[chunked]

    def sampling_state(self):
        """The sampling ops' draft state of this state (:class:`~jacobi_engine.op_args.SamplingState`)."""
        from jacobi_engine import ops

        return ops.SamplingState(
            self.proposal, self.draft_sampled, self.verified_in_chunk, self.seed, self.sequence_ids, self.step
        )

    def _buffers(self):
        for spec_field in fields(self):
            spec = spec_field.metadata.get("buffer")
            if spec is not None and getattr(self, spec_field.name) is not None:
                yield spec_field.name, spec

    def reset_counters(self) -> None:
        """Zeroes what counts over a call (the histogram, the step counter, ...)."""
        for name, spec in self._buffers():
            if spec["reset"]:
                getattr(self, name).zero_()

    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, copy) of every piece of state a decode step mutates, the guess strategy's and the
        pool's tensors and the cache lengths included (not the K/V rows: a step writes only rows
        past the committed lengths, which later steps overwrite like any rejected guess)."""
        tensors = [getattr(self, name) for name, spec in self._buffers() if spec["mutable"]]
        tensors.append(self.cache.cache_seqlens)
        tensors += [value for value in vars(self.guesses).values() if isinstance(value, torch.Tensor)]
        if self.pool is not None:
            tensors += self.pool.tensors()
        return [(tensor, tensor.clone()) for tensor in tensors]

    @staticmethod
    def restore(snapshot) -> None:
        for tensor, saved in snapshot:
            tensor.copy_(saved)

    def view(self, block_size: int, candidates: int) -> StepState:
        """This state decoding with ``block_size`` slots and ``candidates`` branches (at most the state's):
        a state sharing every buffer but the per-width ones, which it gets its own of (made once, kept).
        A step on the view commits into the same tokens, lengths and cache."""
        key = self.key
        if not (1 <= block_size <= key.block_size and 0 <= candidates <= key.candidates):
            raise ValueError(
                f"a view of {block_size} slots and {candidates} candidates exceeds the state's "
                f"{key.block_size} and {key.candidates}"
            )
        if block_size == key.block_size and candidates == key.candidates:
            return self
        views = self.__dict__.setdefault("_views", {})
        found = views.get((block_size, candidates))
        if found is not None:
            return found
        width_key = dataclasses.replace(key, block_size=block_size, candidates=candidates)
        changes = {}
        for spec_field in fields(self):
            spec = spec_field.metadata.get("buffer")
            if spec is not None and spec["per_width"] and getattr(self, spec_field.name) is not None:
                if spec["when"] is None or spec["when"](width_key):
                    changes[spec_field.name] = _allocate_buffer(spec, width_key)
                else:
                    changes[spec_field.name] = None
        view = dataclasses.replace(self, key=width_key, **changes)
        view.__dict__["_views"] = views  # a view of a view is one of the same family
        views[(block_size, candidates)] = view
        return view

    @property
    def nbytes(self) -> int:
        """Device bytes of this state: the KV cache, the pool and every buffer."""
        total = self.cache.nbytes + sum(getattr(self, name).nbytes for name, _ in self._buffers())
        if self.pool is not None:
            total += sum(tensor.nbytes for tensor in self.pool.tensors())
        return total


def allocate(key: StateKey, num_layers: int, guess_strategy: GuessStrategy, pool_buckets: int, pool_slots: int):
    """A fresh :class:`StepState` for ``key`` (the K/V buffers are allocated at the first forward)."""
    device = key.device
    pool = None
    if key.candidates:
        pool = CandidatePool(key.batch, key.candidate_len, pool_buckets, pool_slots, device)
    state = StepState(
        key=key,
        cache=JacobiCache(num_layers, key.batch, key.capacity + key.tree_tokens, device),
        guesses=copy.copy(guess_strategy),
        pool=pool,
    )
    for spec_field in fields(StepState):
        spec = spec_field.metadata.get("buffer")
        if spec is None or (spec["when"] is not None and not spec["when"](key)):
            continue
        setattr(state, spec_field.name, _allocate_buffer(spec, key))
    return state


def _allocate_buffer(spec: dict, key: StateKey) -> torch.Tensor:
    if spec["init"] is not None:
        return spec["init"](key).to(device=key.device, dtype=spec["dtype"])
    return torch.zeros(spec["shape"](key), dtype=spec["dtype"], device=key.device)
