"""The Jacobi decoding loop: check the request, get its state, prefill, run the steps, build the output.

Each phase lives in its own module: settings in :mod:`~jacobi_engine.config`, the request and its
checks in :mod:`~jacobi_engine.inputs`, the device state in :mod:`~jacobi_engine.state` (cached with
its step variants in :mod:`~jacobi_engine.entries`), the model forward and the first token in
:mod:`~jacobi_engine.prefill`, the step in :mod:`~jacobi_engine.step`, the loop, compile and capture
in :mod:`~jacobi_engine.runner`, the output in :mod:`~jacobi_engine.output`, the measured step costs
of ``block_size="auto"`` in :mod:`~jacobi_engine.adaptive`. Requests that join and leave a running
batch are :mod:`~jacobi_engine.scheduler`'s.

The fixed point of the iteration is exactly greedy autoregressive decoding, with the
generation_config processors HF applies (:mod:`jacobi_engine.processors`). With ``do_sample=True``
the output is distributed exactly like HF's sampling (:mod:`jacobi_engine.sampling`).
"""

from __future__ import annotations

import threading
import time
import warnings

import torch

from jacobi_engine import adaptive, ops
from jacobi_engine.attention import jacobi_attention_enabled
from jacobi_engine.config import EngineConfig, split_engine_kwargs
from jacobi_engine.entries import Entry, StateCache, entry_key, new_entry
from jacobi_engine.guesses import GuessStrategy, make_guess_strategy
from jacobi_engine.hf_compat import (
    has_windowed_attention,
    inspect_model,
    is_tensor_parallel,
    length_dependent_rope,
    model_device,
)
from jacobi_engine.inputs import (
    ModelLimits,
    Request,
    check_engine_request,
    check_engine_settings,
    make_request,
    position_limit,
)
from jacobi_engine.output import JacobiOutput, JacobiStats, Timings, build_output, empty_output
from jacobi_engine.prefill import prefill, start_decoding
from jacobi_engine.runner import Runner, Stream
from jacobi_engine.state import StateKey, capacity_bucket

__all__ = ["JacobiEngine", "JacobiOutput", "JacobiStats", "generate"]


class JacobiEngine:
    """Jacobi decoding for a Hugging Face decoder-only causal LM.

    Args:
        model: a ``transformers`` causal LM whose attention goes through ``AttentionInterface``.
            It is not modified; the engine switches it to its own attention only during its calls.
        block_size: n, tokens per Jacobi block (1 = plain autoregressive decoding), at most 1024, or
            ``"auto"``: chosen per sync among a few widths from a measured cost model
            (:mod:`jacobi_engine.adaptive`). Left out: ``"auto"``, with ``candidates="auto"`` and
            ``init="ngram"`` (in ``mode="chunked"``: 16), the setting that measured fastest (README).
        mode: ``"sliding"`` keeps n guesses in flight, sliding past every accepted token;
            ``"chunked"`` iterates each n-token chunk to its fixed point before starting the next
            (the CLLM trajectory that consistency training uses).
        init: initial guesses: ``"random_prompt"`` (random prompt tokens, CLLM), ``"ngram"``
            (lookup in the prompt and output so far) or a :class:`GuessStrategy`. Left out:
            ``"ngram"`` when the block or the candidates are ``"auto"``, else ``"random_prompt"``.
        max_seq_len: if set, the cache is allocated once for prompts + new tokens up to this
            length and longer requests are refused; by default it is sized per request, rounded
            up to a power of two so that similar requests share one state.
        seed: seeds the random initial guesses (and sampling), so every call is reproducible.
        attention_backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`jacobi_engine.ops`).
        verify_backend: ``"auto"``, ``"native"`` (compiled op) or ``"torch"``.
        cuda_graph: capture the whole Jacobi step (model forward + processors + verify/commit +
            guesses) in a CUDA graph once per state and replay it (CUDA models only).
        sync_every: decode steps between host checks of the done flags (default 1, or 8 with
            ``cuda_graph``). Steps past the end are harmless no-ops for finished sequences.
        candidates: k, pooled n-gram candidates verified beside the block in the same forward
            (:mod:`jacobi_engine.pool`); 0 is plain Jacobi; at most 64 (32 when sampling); ``"auto"``
            chooses k per sync. Left out: ``"auto"`` when ``block_size`` is, else 0.
        candidate_len: g, tokens per candidate (in chunked mode at most ``block_size - 1``).
        pool_buckets, pool_slots: the pool's hash buckets per sequence and entries per bucket.
        sampling_rule: how sampled Jacobi drafts are verified when ``do_sample=True``: ``"sjd"``
            (min(1, p/q) against the distribution the draft was drawn from) or ``"one_hot"`` (accept
            with p(draft), the rule for deterministic drafts). Both are exact; ``"sjd"`` accepts more.
        compile: compile the whole decode step with ``torch.compile(fullgraph=True)`` once per
            state (:mod:`jacobi_engine.compile`); with ``cuda_graph`` the compiled step is what gets
            captured. A model that cannot be compiled is decoded eagerly, with a warning.
        max_cached_states: states (each with its KV cache) kept for reuse across calls; :meth:`clear`
            frees them.

    Threads: one engine serves one call at a time; concurrent calls wait for each other (a lock).
    Engines on the same model may run in parallel threads, and the model stays usable on its own
    meanwhile (see :mod:`jacobi_engine.attention`).
    """

    def __init__(self, model, **settings):
        self.config = EngineConfig(**settings)
        self.info = inspect_model(model)
        if self.config.adaptive and is_tensor_parallel(model):
            self.config = _tensor_parallel_config(settings)
        self.model = model
        device = model_device(model)
        config = self.config
        self.rope_switches = length_dependent_rope(model)
        self.windowed_attention = has_windowed_attention(model)
        check_engine_settings(config, self.limits)
        self.verify_backend = ops.resolve_verify_backend(config.verify_backend, device, graph_safe=config.cuda_graph)
        warning = ops.verify_backend_warning(device) if config.verify_backend == "auto" else None
        if warning is not None:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        self.guess_strategy: GuessStrategy = make_guess_strategy(config.init)
        self.states = StateCache(config.max_cached_states)
        self.runner = Runner(model, config.verified_width, config.tree_tokens, config.steps_between_syncs)
        dtype = next(model.parameters()).dtype
        self.cost_model = adaptive.engine_cost_model(config.cost_model, config.adaptive, device, dtype)
        self._lock = threading.RLock()

    # Settings read as attributes, as before the config existed.
    def __getattr__(self, name):
        config = self.__dict__.get("config")
        if config is not None and hasattr(config, name):
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def seed(self) -> int:
        return self.config.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self.config = self.config.replace(seed=value)

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(
            self.info, model_device(self.model), self.rope_switches, self.windowed_attention, self.config.max_seq_len
        )

    # -- phases --------------------------------------------------------------------------------
    def _entry(self, request: Request) -> Entry:
        """The state of this request's key, from the cache or allocated."""
        config = self.config
        capacity = config.max_seq_len if config.max_seq_len is not None else capacity_bucket(request.needed_rows)
        key = entry_key(
            config,
            request.settings,
            self.model,
            self.info,
            batch=request.batch,
            capacity=capacity,
            logging=request.record_trajectory,
        )
        return self.states.get(key, lambda: self._new_entry(key))

    def _new_entry(self, key: StateKey) -> Entry:
        return new_entry(key, self.model, self.info, self.config, self.guess_strategy, self.verify_backend)

    def save_cost_model(self, path) -> None:
        """Writes the measured step costs (``JacobiEngine(..., cost_model=path)`` reuses them)."""
        adaptive.save_cost_model(self.cost_model, path)

    # -- the call ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> JacobiOutput:
        """Generation by Jacobi iteration. Greedy (``do_sample=False``): token-identical to
        ``model.generate(do_sample=False)`` with the same settings. Sampling (``do_sample=True``):
        distributed exactly like ``model.generate(do_sample=True)``, the warpers ``temperature``,
        ``top_k``, ``top_p`` and ``min_p`` applied after the processors as HF orders them; the random
        numbers come from the engine's ``seed`` and each row's index, so the same seed and inputs
        give the same output and a row's tokens do not depend on the rest of its batch.

        ``input_ids`` [B, P] (or [P]) int, left-padded when ``attention_mask`` [B, P] marks padding
        (without a mask, one is inferred from ``pad_token_id`` as HF does). Keyword arguments:
        ``max_new_tokens``, ``eos_token_id`` (an int, a list, ``[]`` for "no EOS"), ``pad_token_id``,
        ``streamer`` (batch 1), ``return_stats`` (True), ``record_trajectory`` (False),
        ``generation_config`` (replaces the model's), and any generation_config field, e.g.
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
        ``no_repeat_ngram_size``, ``bad_words_ids``, ``min_new_tokens``, ``suppress_tokens``. Settings
        default to the model's ``generation_config``, as in ``model.generate``. The processors that
        change greedy output are applied to every block slot with its own prefix; any other setting
        that would change the output is refused, naming it.
        """
        with self._lock:
            request = make_request(self.model, self.limits, input_ids, attention_mask, **kwargs)
            check_engine_request(request, self.config)
            stream = Stream(request.streamer)
            stream.put(request.prompts.input_ids)
            if request.max_new_tokens == 0:
                stream.end()
                config = self.config
                return empty_output(
                    request.prompts.input_ids,
                    config.max_block_size,
                    config.mode,
                    request.return_stats,
                    request.record_trajectory,
                )
            entry = self._entry(request)
            timings = self._decode(entry, request, stream)
            stream.end()
            settings = request.settings
            return build_output(
                entry.state,
                request.prompts.width,
                request.prompts.lengths,
                settings.pad_token_id,
                self.config.mode,
                timings,
                request.return_stats,
                request.record_trajectory,
                None if entry.policy is None else entry.policy.summary(),
            )

    def _decode(self, entry: Entry, request: Request, stream: Stream) -> Timings:
        """Prefill every row of the entry with the request, then decode until all are done."""
        state, prompts, settings = entry.state, request.prompts, request.settings
        sync = torch.cuda.synchronize if state.key.device.type == "cuda" else (lambda: None)
        timings = Timings()
        started = time.perf_counter()
        with jacobi_attention_enabled(self.model, entry.context):
            self.runner.to_primary(entry, carry=False)  # prefill writes the state itself
            logits = prefill(self.model, self.info, entry.context, state.cache, prompts)
            state.reset_counters()
            generator = torch.Generator(device=state.key.device)
            generator.manual_seed(self.config.seed)
            first = start_decoding(
                entry.config,
                state,
                slice(None),
                prompts,
                logits,
                max_new_tokens=settings.max_new_tokens,
                eos_ids=settings.eos_ids,
                pad_token_id=settings.pad_token_id,
                position_limit=position_limit(self.limits, prompts.lengths, settings.max_new_tokens),
                seed=self.config.seed,
                generator=generator,
            )
            sync()
            timings.prefill = time.perf_counter() - started
            stream.put(first)
            stream.streamed = prompts.width + 1
            if self.config.compile:
                timings.compile = self.runner.compile(entry)
            if self.config.cuda_graph:
                timings.capture = self.runner.capture(entry)
            # A seeded sampling call repeats itself: its choice starts from nothing, not the last call's.
            timings.cost_model = self.runner.start_policy(entry, self.cost_model, carry=entry.key.sampling is None)
            decode_started = time.perf_counter()
            self.runner.run_until_done(entry, settings.max_new_tokens + self.config.max_block_size, stream)
            sync()
            timings.decode = time.perf_counter() - decode_started
        return timings

    # -- continuous batching ------------------------------------------------------------------
    def scheduler(self, max_batch: int = 8, max_seq_len: int | None = None, **generation_kwargs):
        """A new :class:`~jacobi_engine.scheduler.Scheduler` on this engine: requests join and leave a
        running batch of ``max_batch`` rows (``max_seq_len``: prompt + new tokens per request; default the
        engine's ``max_seq_len``, else 2048 capped at the model's positions)."""
        from jacobi_engine.scheduler import Scheduler

        if max_seq_len is None:
            max_seq_len = self.config.max_seq_len or min(2048, self.info.max_positions or 2048)
        return Scheduler(self, max_batch, max_seq_len, **generation_kwargs)

    def add_request(self, prompt, max_new_tokens: int | None = None, **callbacks):
        """Queues a request on the engine's default scheduler (:meth:`scheduler` with its defaults, made at
        the first call); :meth:`step` advances it. Returns the request's handle."""
        if self.__dict__.get("_default_scheduler") is None:
            self._default_scheduler = self.scheduler()
        return self._default_scheduler.add_request(prompt, max_new_tokens, **callbacks)

    def step(self) -> list:
        """One round of the default scheduler (admit, decode, hand out tokens); the requests that finished."""
        scheduler = self.__dict__.get("_default_scheduler")
        return [] if scheduler is None else scheduler.step()

    def cancel(self, handle) -> None:
        """Cancels a request of the default scheduler."""
        scheduler = self.__dict__.get("_default_scheduler")
        if scheduler is not None:
            scheduler.cancel(handle)

    # -- inspection and memory -------------------------------------------------------------------
    def cached_states(self) -> list[Entry]:
        """The cached entries (state, step config, compiled step, graph), least recently used first."""
        return self.states.entries()

    def clear(self) -> None:
        """Frees every cached state (KV caches, pools, captured graphs, compiled steps)."""
        with self._lock:
            self.states.clear()

    @property
    def memory_bytes(self) -> int:
        """Device bytes held by the cached states."""
        return self.states.nbytes

    def watch_steps(self, watcher):
        """Calls ``watcher(entry, run_step)`` instead of each eager decode step inside this context
        (``run_step()`` runs it): for tests and profiling."""
        return self.runner.watching(watcher)


_COST_MODEL_ATTRIBUTE = "_jacobi_engine_cost_model"


def generate(model, input_ids: torch.Tensor, **kwargs) -> JacobiOutput:
    """One-call shortcut: ``JacobiEngine(model, <engine settings>).generate(input_ids, <the rest>)``.

    With ``"auto"`` (the default) and no ``cost_model`` given, the step costs measured by one call are
    kept on ``model`` (for its device and dtype) and reused by the next, so that repeated calls do not
    each time the step shapes again. For repeated calls, a :class:`JacobiEngine` kept by the caller
    also keeps its states and what its calls learned."""
    engine_kwargs, generate_kwargs = split_engine_kwargs(kwargs)
    engine = JacobiEngine(model, **engine_kwargs)  # checks the model and the settings first
    if engine.config.adaptive and engine_kwargs.get("cost_model") is None:
        device, dtype = model_device(model), next(model.parameters()).dtype
        shared = model.__dict__.get(_COST_MODEL_ATTRIBUTE)
        if shared is not None and shared.matches(device, dtype):
            engine.cost_model = shared
        else:
            model.__dict__[_COST_MODEL_ATTRIBUTE] = engine.cost_model
    return engine.generate(input_ids, **generate_kwargs)


def _tensor_parallel_config(settings: dict) -> EngineConfig:
    """The settings of a tensor-parallel engine: every rank must run the same step shape (each forward's
    collectives have the block's shape), and an auto choice follows each rank's own timings. The
    block, candidates and guesses left out are the fixed-step defaults (16 slots, no candidates,
    random prompt guesses); ``"auto"`` asked for is refused."""
    asked = [name for name in ("block_size", "candidates") if settings.get(name) == "auto"]
    if asked:
        raise ValueError(
            f"{asked[0]}='auto' is not supported under tensor parallelism: each rank would choose the step "
            "shape from its own timings, and the ranks' forwards must match; pass a fixed block_size (and "
            "candidates)"
        )
    block_size = settings.get("block_size")
    return EngineConfig(**{**settings, "block_size": 16 if block_size is None else block_size})
