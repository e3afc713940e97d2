"""Continuous batching: requests join and leave a running batch at step boundaries.

A :class:`Scheduler` owns one decode state of ``max_batch`` rows over a static per-row KV cache of
``max_seq_len`` rows. A request waits until a row is free; then its prompt alone is prefilled into
that row (a forward on a view of the row's cache, :meth:`JacobiCache.rows`) while the other rows keep
their state, and from the next step on it decodes with the batch. A row whose request finished (EOS,
its ``max_new_tokens``) or was cancelled is freed at the step boundary and refilled by the next
waiting request. Every step is the engine's own decode step, so each greedy request's tokens are
exactly what decoding it alone gives (= ``model.generate(do_sample=False)``), whatever joined or left
beside it: rows never read each other (attention is per row, the verify op is per row, guesses
never change greedy tokens).

    scheduler = engine.scheduler(max_batch=8, max_seq_len=1024)
    handle = scheduler.add_request(prompt_ids, max_new_tokens=128, on_tokens=print)
    while scheduler.has_work:
        scheduler.step()
    handle.tokens, handle.finish_reason  # "stop", "length" or "cancelled"

Settings: one scheduler decodes with one set of generation settings (greedy or one sampling
configuration, processors, EOS ids), resolved once at creation as ``generate`` resolves them; only
``max_new_tokens`` is per request. Sampling is exact in distribution; a row's random numbers depend on
its row and the step at which it runs, so a seed makes a scheduler run reproducible as a whole, not
one request apart from its neighbours.

Threads: ``add_request`` and ``cancel`` may be called from any thread; ``step`` runs under the engine's
lock (one thread steps, typically a server loop).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from jacobi_engine.attention import jacobi_attention_enabled
from jacobi_engine.config import check_int
from jacobi_engine.entries import entry_key
from jacobi_engine.inputs import (
    check_input_ids,
    check_lengths,
    check_sampling_candidates,
    make_request,
    position_limit,
)
from jacobi_engine.prefill import Prompts, prefill, start_decoding
from jacobi_engine.state import capacity_bucket

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class RequestHandle:
    """One request of a :class:`Scheduler`: its prompt, its tokens so far and how it ended.

    ``tokens`` grows as steps verify them (EOS included when the request stopped on it);
    ``on_tokens(handle, new_tokens)`` is called from the stepping thread with each new piece, and
    ``on_finish(handle)`` once at the end. ``forwards`` counts the model forwards the request took
    part in (its prefill included), so ``len(tokens) / forwards`` is its tokens per forward.
    """

    request_id: int
    prompt: list[int]
    max_new_tokens: int
    on_tokens: Callable | None = None
    on_finish: Callable | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    forwards: int = 0
    row: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    error: str | None = None  # set when the stepping thread failed on this request's batch
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: bool = field(default=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the request finished (another thread steps the scheduler); False on timeout."""
        return self._done.wait(timeout)


class Scheduler:
    """Continuous batching over one engine (see the module docstring).

    Args:
        engine: the :class:`~jacobi_engine.JacobiEngine` whose settings (block size, mode, guesses,
            candidates, compile, cuda_graph) every step uses.
        max_batch: rows decoded together.
        max_seq_len: cache rows per request (prompt + new tokens); longer requests are refused.
        generation_config, **generation_kwargs: the generation settings of every request, resolved as
            ``generate`` resolves them (``max_new_tokens`` there is the default of ``add_request``).
        seed: the random numbers of this scheduler (initial guesses, sampling); default the engine's.
    """

    def __init__(
        self,
        engine,
        max_batch: int = 8,
        max_seq_len: int = 2048,
        generation_config=None,
        *,
        seed: int | None = None,
        **generation_kwargs,
    ):
        check_int("max_batch", max_batch, minimum=1)
        check_int("max_seq_len", max_seq_len, minimum=2)
        limits = engine.limits
        if limits.info.max_positions is not None and max_seq_len > limits.info.max_positions:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {limits.info.max_positions} positions")
        if engine.config.max_seq_len is not None and max_seq_len > engine.config.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the engine's max_seq_len={engine.config.max_seq_len}")
        self.engine = engine
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        # The settings of every request, resolved once on a one-token prompt.
        probe = torch.zeros(1, 1, dtype=torch.long, device=limits.device)
        resolved = make_request(
            engine.model,
            limits,
            probe,
            torch.ones_like(probe),
            generation_config=generation_config,
            **generation_kwargs,
        )
        self.settings = resolved.settings
        if self.settings.processors.active:
            spec = self.settings.processors
            if spec.min_new_tokens or spec.forced_eos_token_id or spec.min_length:
                raise ValueError(
                    "min_new_tokens, min_length and forced_eos_token_id depend on each request's prompt width; "
                    "the scheduler shares one set of processors among its requests: use generate() for them"
                )
            self.settings = dataclasses.replace(
                self.settings, processors=dataclasses.replace(spec, prompt_width=0, max_length=0)
            )
        check_sampling_candidates(resolved.settings, engine.config)
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._rows: list[RequestHandle | None] = [None] * max_batch
        self._streamed = [0] * max_batch  # token columns of each row handed out so far
        self._ids = itertools.count()
        self._queue_lock = threading.Lock()
        self._entry = None
        self.seed = engine.config.seed if seed is None else seed
        check_int("seed", self.seed)
        self.generator = torch.Generator(device=limits.device)
        self.generator.manual_seed(self.seed)
        self.steps_taken = 0

    # -- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        prompt,
        max_new_tokens: int | None = None,
        *,
        on_tokens: Callable | None = None,
        on_finish: Callable | None = None,
    ) -> RequestHandle:
        """Queues a request: ``prompt`` a 1-D tensor or list of token ids (no padding). Returns its handle."""
        limits = self.engine.limits
        if isinstance(prompt, (list, tuple)):
            if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise TypeError("prompt must be a non-empty list of int token ids or a 1-D tensor")
            prompt = torch.tensor(prompt, dtype=torch.long, device=limits.device)
        if isinstance(prompt, torch.Tensor) and prompt.dim() != 1:
            raise ValueError(f"prompt must be 1-D (one request), got shape {tuple(prompt.shape)}")
        ids = check_input_ids(prompt, limits)[0]
        if max_new_tokens is None:
            max_new_tokens = self.settings.max_new_tokens
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        check_lengths(ids.numel(), ids.numel(), max_new_tokens, limits)
        needed = ids.numel() + max_new_tokens
        if needed > self.max_seq_len:
            raise ValueError(
                f"prompt length {ids.numel()} + max_new_tokens {max_new_tokens} = {needed} exceeds the scheduler's "
                f"max_seq_len={self.max_seq_len}"
            )
        handle = RequestHandle(next(self._ids), ids.tolist(), max_new_tokens, on_tokens, on_finish)
        with self._queue_lock:
            self._waiting.append(handle)
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Stops a request: a waiting one never starts, a running one leaves its row at the next step."""
        handle._cancel = True
        with self._queue_lock:
            if handle in self._waiting:
                self._waiting.remove(handle)
                self._finish(handle, "cancelled")

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or any(handle is not None for handle in self._rows)

    @property
    def running(self) -> int:
        return sum(handle is not None for handle in self._rows)

    # -- stepping ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestHandle]:
        """One round: admit waiting requests into free rows (their prefill), then ``sync_every`` decode
        steps of the batch, then hand out new tokens and free finished rows. Returns the requests that
        finished in this round."""
        engine = self.engine
        with engine._lock:
            entry = self._get_entry()
            state = entry.state
            finished: list[RequestHandle] = []
            with jacobi_attention_enabled(engine.model, entry.context):
                self._retire_cancelled(finished)
                if self._waiting and any(handle is None for handle in self._rows):
                    running = any(handle is not None for handle in self._rows)
                    engine.runner.to_primary(entry, carry=running)  # admission writes the state itself
                self._admit(entry)
                if not any(handle is not None for handle in self._rows):
                    return finished
                done, longest, known = engine.runner.sync(entry)
                if not done:
                    engine.runner.run_steps(entry, engine.runner.sync_every, longest, known)
                    self.steps_taken += engine.runner.sync_every
            self._collect(state, finished)
            return finished

    def run(self) -> None:
        """Steps until no request is waiting or running."""
        while self.has_work:
            self.step()

    # -- internals -----------------------------------------------------------------------------
    def _get_entry(self):
        if self._entry is not None:
            return self._entry
        engine, settings = self.engine, self.settings
        config = engine.config
        capacity = capacity_bucket(self.max_seq_len)
        key = entry_key(
            config, settings, engine.model, engine.info, batch=self.max_batch, capacity=capacity, logging=False
        )
        entry = engine._new_entry(key)  # the scheduler's own state, not one of the engine's cached ones
        state = entry.state
        state.done.fill_(True)  # every row free
        state.lengths.fill_(1)
        state.limits.fill_(1)
        state.prompt_widths.fill_(1)  # a free row's "prompt" is its first column (guesses need a span)
        state.eos_ids.fill_(-1)
        if settings.eos_ids:
            state.eos_ids[: len(settings.eos_ids)] = torch.tensor(settings.eos_ids, device=key.device)
        state.reset_counters()
        engine.runner.start_policy(entry, engine.cost_model, carry=key.sampling is None)
        if config.compile:
            engine.runner.compile(entry)
        if config.cuda_graph:
            engine.runner.capture(entry)
        self._entry = entry
        return entry

    def _admit(self, entry) -> None:
        engine, state = self.engine, entry.state
        for row, occupant in enumerate(self._rows):
            if occupant is not None:
                continue
            with self._queue_lock:
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            ids = torch.tensor([handle.prompt], dtype=torch.long, device=state.key.device)
            length = ids.shape[1]
            lengths = torch.tensor([length], device=ids.device)
            prompts = Prompts(ids, torch.ones_like(ids), lengths, length, length)
            view = state.cache.rows(row, row + 1)
            logits = prefill(engine.model, engine.info, entry.context, view, prompts)
            start_decoding(
                entry.config,
                state,
                slice(row, row + 1),
                prompts,
                logits,
                max_new_tokens=handle.max_new_tokens,
                eos_ids=self.settings.eos_ids,
                pad_token_id=self.settings.pad_token_id,
                position_limit=position_limit(engine.limits, lengths, handle.max_new_tokens),
                seed=self.seed,
                generator=self.generator,
            )
            handle.row, handle.forwards = row, 1
            self._rows[row] = handle
            self._streamed[row] = length

    def _retire_cancelled(self, finished: list) -> None:
        state = self._entry.state
        for row, handle in enumerate(self._rows):
            if handle is not None and handle._cancel:
                state.done[row] = True
                self._rows[row] = None
                self._finish(handle, "cancelled")
                finished.append(handle)

    def _collect(self, state, finished: list) -> None:
        """Hands out new tokens and frees the rows of finished requests (one host transfer)."""
        rows = [row for row, handle in enumerate(self._rows) if handle is not None]
        if not rows:
            return
        lengths, done, forwards = (
            torch.stack([state.lengths.long(), state.done.long(), state.row_forwards.long()]).cpu().tolist()
        )
        eos = set(self.settings.eos_ids)
        for row in rows:
            handle = self._rows[row]
            start, stop = self._streamed[row], lengths[row]
            if stop > start:
                new = state.tokens[row, start:stop].tolist()
                if handle.first_token_at is None:
                    handle.first_token_at = time.perf_counter()
                handle.tokens.extend(new)
                self._streamed[row] = stop
                if handle.on_tokens is not None:
                    handle.on_tokens(handle, new)
            handle.forwards = 1 + forwards[row]
            if done[row]:
                self._rows[row] = None
                reason = "stop" if handle.tokens and handle.tokens[-1] in eos else "length"
                self._finish(handle, reason)
                finished.append(handle)

    @staticmethod
    def _finish(handle: RequestHandle, reason: str) -> None:
        handle.finish_reason = reason
        handle.finished_at = time.perf_counter()
        handle.row = None
        if handle.on_finish is not None:
            handle.on_finish(handle)
        handle._done.set()
