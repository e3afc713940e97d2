"""The Jacobi decoding loop: validate, resolve the generation settings, prefill, run steps, build
the output.

The step itself (model forward over the n-token block, processors, ``ops.verify_and_commit``,
guesses, statistics) is :func:`jacobi_engine.step.decode_step`, a function of device state only.
The engine keeps that state per (batch, capacity bucket, block size, mode, processors) key and
reuses it across calls, so on CUDA each key's step is captured in a graph once and replayed by
every later ``generate`` with the same key (gpt-fast's pattern); with ``compile=True`` each key's
step is compiled once (:mod:`jacobi_engine.compile`), and on CUDA that compiled step is what the
graph captures.

The fixed point of the iteration is exactly greedy autoregressive decoding, with the
generation_config processors HF applies (:mod:`jacobi_engine.processors`). With ``do_sample=True``
the output is distributed exactly like HF's sampling (:mod:`jacobi_engine.sampling`).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from jacobi_engine import ops, sampling
from jacobi_engine.attention import jacobi_attention_enabled
from jacobi_engine.cache import JacobiCache
from jacobi_engine.compile import (
    abandon_compiled,
    compile_step,
    compiled_steps,
    first_compiled_call,
    is_step_compile_error,
)
from jacobi_engine.guesses import GuessStrategy, make_guess_strategy
from jacobi_engine.hf_compat import has_windowed_attention, inspect_model, length_dependent_rope, model_device
from jacobi_engine.pool import CandidatePool, ngrams_of, tree_layout
from jacobi_engine.processors import GenerationSettings, LogitsProcessing, resolve_generation
from jacobi_engine.step import StepConfig, StepState, decode_step
from jacobi_engine.trajectory import SequenceTrajectory, build_trajectories, count_stationary

MODES = ("sliding", "chunked")


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
    ``capture_seconds`` is the CUDA-graph set-up (warm-up and capture, done once per step-cache
    key), ``compile_seconds`` the ``torch.compile`` of the step with ``compile=True``
    (done once per step-cache key, 0 when the entry was already compiled); both are kept out of
    ``decode_seconds`` (and so out of ``tokens_per_second``).
    ``candidate_wins`` counts the (sequence, decode forward) pairs where a pooled candidate branch
    verified more tokens than the block.
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


def _check_int(name: str, value, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


# Step-cache entries kept per engine (each holds a KV cache and, on CUDA, a captured graph).
MAX_CACHED_STEPS = 4
_MIN_CAPACITY = 64


def _capacity_bucket(needed: int) -> int:
    """Cache rows for a request needing ``needed``: the next power of two, so that requests of
    similar length share one step-cache entry (and one captured graph)."""
    return max(_MIN_CAPACITY, 1 << (needed - 1).bit_length())


@dataclass
class _StepCacheEntry:
    """One step-cache entry: the device state of a (batch, capacity, block, mode, ...) key."""

    state: StepState
    config: StepConfig
    graph: object | None = None  # torch.cuda.CUDAGraph once captured
    compiled: object | None = None  # the torch.compile'd step (compile=True), once compiled
    compile_failed: str | None = None  # why the step could not be compiled (then it runs eagerly)


MAX_SAMPLING_CANDIDATES = 32  # csrc/sampling_verify.h kMaxTreeBranches


class JacobiEngine:
    """Jacobi decoding for a Hugging Face decoder-only causal LM.

    Args:
        model: a ``transformers`` causal LM whose attention goes through ``AttentionInterface``.
            It is not modified; the engine switches it to its own attention only during its calls.
        block_size: n, tokens per Jacobi block (1 = plain autoregressive decoding).
        mode: ``"sliding"`` keeps n guesses in flight, sliding past every accepted token;
            ``"chunked"`` iterates each n-token chunk to its fixed point before starting the next
            (the CLLM trajectory that consistency training uses).
        init: initial guesses: ``"random_prompt"`` (random prompt tokens, CLLM), ``"ngram"``
            (lookup in the prompt and output so far) or a :class:`GuessStrategy`.
        max_seq_len: if set, the cache is allocated once for prompts + new tokens up to this
            length and longer requests are refused; by default it is sized per request, rounded
            up to a power of two so that similar requests share one step-cache entry.
        seed: seeds the random initial guesses, so every call is reproducible.
        attention_backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`jacobi_engine.ops`).
        verify_backend: ``"auto"``, ``"native"`` (compiled op) or ``"torch"``.
        cuda_graph: capture the whole Jacobi step (model forward + processors + verify/commit +
            guesses) in a CUDA graph once per step-cache key and replay it (CUDA models only).
        sync_every: decode steps between host checks of the done flags (default 1, or 8 with
            ``cuda_graph``). Steps past the end are harmless no-ops for finished sequences.
        candidates: k, pooled n-gram candidates verified beside the block in the same forward
            (:mod:`jacobi_engine.pool`); 0 is plain Jacobi.
        candidate_len: g, tokens per candidate (in chunked mode at most ``block_size - 1``).
        pool_buckets, pool_slots: the pool's hash buckets per sequence and entries per bucket.
        sampling_rule: how sampled Jacobi drafts are verified when ``do_sample=True``: ``"sjd"``
            (min(1, p/q) against the distribution the draft was drawn from) or ``"one_hot"`` (accept
            with p(draft), the rule for deterministic drafts). Both are exact; ``"sjd"`` accepts more.
        compile: compile the whole decode step with ``torch.compile(fullgraph=True)`` once per
            step-cache key (:mod:`jacobi_engine.compile`); with ``cuda_graph`` the compiled step is
            what gets captured. A model that cannot be compiled is decoded eagerly, with a warning.
    """

    def __init__(
        self,
        model,
        block_size: int = 16,
        mode: str = "sliding",
        init: str | GuessStrategy = "random_prompt",
        max_seq_len: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        verify_backend: str = "auto",
        cuda_graph: bool = False,
        sync_every: int | None = None,
        candidates: int = 0,
        candidate_len: int = 4,
        pool_buckets: int = 4096,
        pool_slots: int = 8,
        sampling_rule: str = "sjd",
        compile: bool = False,
    ):
        self.info = inspect_model(model)
        _check_int("block_size", block_size, minimum=1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_int("max_seq_len", max_seq_len, minimum=1, allow_none=True)
        self.rope_switches = length_dependent_rope(model)
        self.windowed_attention = has_windowed_attention(model)
        if (
            max_seq_len is not None
            and not self.rope_switches
            and self.info.max_positions is not None
            and max_seq_len > self.info.max_positions
        ):
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {self.info.max_positions} positions")
        _check_int("seed", seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits (torch.Generator), got {seed}")
        if attention_backend not in ops.ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ops.ATTENTION_BACKENDS}, got {attention_backend!r}")
        if verify_backend not in ops.VERIFY_BACKENDS:
            raise ValueError(f"verify_backend must be one of {ops.VERIFY_BACKENDS}, got {verify_backend!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and model_device(model).type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {model_device(model)}")
        _check_int("sync_every", sync_every, minimum=1, allow_none=True)
        _check_int("candidates", candidates, minimum=0)
        _check_int("candidate_len", candidate_len, minimum=1)
        _check_int("pool_buckets", pool_buckets, minimum=1)
        _check_int("pool_slots", pool_slots, minimum=1)
        if candidates > pool_slots:
            raise ValueError(f"candidates={candidates} exceeds pool_slots={pool_slots} (entries looked up per key)")
        if candidates and mode == "chunked" and candidate_len > block_size - 1:
            raise ValueError(
                f"candidate_len={candidate_len} must be <= block_size - 1 = {block_size - 1} in chunked mode "
                "(a branch verifies part of the current chunk)"
            )
        self.candidates = candidates
        self.candidate_len = candidate_len
        self.pool_buckets = pool_buckets
        self.pool_slots = pool_slots
        if sampling_rule not in sampling.SAMPLING_RULES:
            raise ValueError(f"sampling_rule must be one of {sampling.SAMPLING_RULES}, got {sampling_rule!r}")
        self.sampling_rule = sampling_rule
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
        self.compile = compile
        self.cuda_graph = cuda_graph
        self.sync_every = sync_every if sync_every is not None else (8 if cuda_graph else 1)
        self.model = model
        self.block_size = block_size
        self.mode = mode
        self.guess_strategy = make_guess_strategy(init)
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.attention_backend = attention_backend
        self.verify_backend = verify_backend
        self._step_cache: OrderedDict[tuple, _StepCacheEntry] = OrderedDict()

    # -- input validation ------------------------------------------------------------------
    def _check_input_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        device = model_device(self.model)
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
        input_ids = input_ids.to(torch.long)
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.info.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids contains id {bad}, outside the vocabulary [0, {self.info.vocab_size})")
        return input_ids

    def _attention_mask(self, input_ids, attention_mask, settings: GenerationSettings, mask_pad_id) -> torch.Tensor:
        if attention_mask is None:
            # HF's inference: masked where input_ids == pad_token_id, if that id occurs and is no EOS.
            if (
                mask_pad_id is not None
                and mask_pad_id not in settings.eos_ids
                and bool((input_ids == mask_pad_id).any())
            ):
                attention_mask = (input_ids != mask_pad_id).to(torch.long)
                source = f"attention_mask (inferred from pad_token_id={mask_pad_id}, as model.generate does)"
            else:
                return torch.ones_like(input_ids)
        else:
            source = "attention_mask"
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                    f"shape {tuple(input_ids.shape)}"
                )
            if attention_mask.device != input_ids.device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {input_ids.device}")
            if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must contain only 0 and 1")
            attention_mask = attention_mask.to(torch.long)
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError(f"{source} has a row with no tokens: every prompt needs at least one")
        # Masked tokens inside a prompt are left out (HF never attends to them and skips their
        # positions); a masked last token would make HF predict from a padding position.
        holes = (attention_mask[:, 1:] < attention_mask[:, :-1]).any()
        if self.windowed_attention and bool(holes):
            raise ValueError(
                f"{source} masks tokens inside a prompt, and this model has sliding-window or chunked attention: "
                "HF counts masked positions inside the window, which jacobi_engine (which leaves masked tokens "
                "out) does not reproduce; left-pad the prompts instead"
            )
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                f"{source} masks the last token of a prompt (right padding): decoder-only generation "
                "needs left-padded prompts"
            )
        return attention_mask

    def _check_lengths(self, longest: int, width: int, max_new_tokens: int) -> None:
        needed = longest + max_new_tokens
        for rope_type, switch in self.rope_switches:
            # HF's last forward sees positions up to longest + max_new_tokens - 2.
            if longest + max_new_tokens - 1 > switch:
                raise ValueError(
                    f"prompt length {longest} + max_new_tokens {max_new_tokens} passes {switch} tokens, where this "
                    f"model's rope_type {rope_type!r} switches to other frequencies mid-generation; jacobi_engine "
                    f"serves {rope_type!r} RoPE models up to {switch + 1} tokens (prompt + new)"
                )
        limit = self.info.max_positions
        if not self.rope_switches and limit is not None and needed > limit:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} = {needed} exceeds the model's "
                f"{limit} positions"
            )
        if self.max_seq_len is not None and max(needed, width + max_new_tokens) > self.max_seq_len:
            raise ValueError(
                f"prompt length {width} + max_new_tokens {max_new_tokens} = {width + max_new_tokens} exceeds "
                f"max_seq_len={self.max_seq_len}"
            )

    # -- model plumbing ----------------------------------------------------------------------
    def _forward(self, cache: JacobiCache, input_ids, position_ids, logits_to_keep=None) -> tuple[torch.Tensor, bool]:
        """Model forward over ``input_ids`` on top of ``cache``; returns (logits, whether logits_to_keep applied)."""
        # The all-ones mask is never read by our attention (masking comes from cache_seqlens) and
        # transformers builds no mask for it; passing one stops models such as GPT-2 from probing
        # input_ids for padding with a host sync in every forward.
        kwargs = {
            self.info.cache_keyword: cache,
            "position_ids": position_ids,
            "attention_mask": cache.ones_mask,
            "use_cache": True,
        }
        if logits_to_keep is not None and self.info.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        else:
            logits_to_keep = None
        output = self.model(input_ids=input_ids, **kwargs)
        cache.end_forward()
        return output.logits, logits_to_keep is not None

    def _block_forward(self, cache: JacobiCache, block, positions) -> torch.Tensor:
        return self._forward(cache, block, positions)[0]

    def _prefill(self, cache: JacobiCache, input_ids, attention_mask, prompt_lengths) -> torch.Tensor:
        """Runs each prompt's unmasked tokens, in order, into the cache; returns their next-token logits."""
        batch = input_ids.shape[0]
        longest = int(prompt_lengths.max())
        # A stable sort puts each row's unmasked columns first, in their order.
        columns = torch.sort((attention_mask == 0).to(torch.int8), dim=1, stable=True).indices[:, :longest]
        prompt_tokens = input_ids.gather(1, columns)  # [B, longest], real tokens first
        positions = torch.arange(longest, device=input_ids.device)[None].expand(batch, -1)
        last = prompt_lengths - 1
        keep = torch.unique(last)
        cache.kv_len_bound = longest
        logits, kept = self._forward(cache, prompt_tokens, positions, logits_to_keep=keep)
        rows = torch.arange(batch, device=input_ids.device)
        if kept:
            return logits[rows, torch.searchsorted(keep, last)]
        return logits[rows, last]

    def _entry(self, batch: int, capacity: int, eos_slots: int, settings: GenerationSettings, logging: bool, device):
        """The step-cache entry of this key, created (and the oldest evicted) when missing."""
        spec = settings.processors if settings.processors.active else None
        dtype = next(self.model.parameters()).dtype
        key = (
            batch,
            capacity,
            self.block_size,
            self.mode,
            self.candidates,
            eos_slots,
            spec,
            settings.sampling,
            logging,
            device,
            dtype,
        )
        entry = self._step_cache.get(key)
        if entry is not None:
            self._step_cache.move_to_end(key)
            return entry
        n, k, g = self.block_size, self.candidates, self.candidate_len
        tree_tokens = n + k * g  # tokens per decode forward (and cache rows it appends)
        width = capacity + max(n, g + 1)  # token columns: prompt + new tokens + one verified row of slack
        max_steps = capacity + n  # Jacobi verifies >= 1 token per forward: a bound on the steps

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        state = StepState(
            cache=JacobiCache(self.info.num_layers, batch, capacity + tree_tokens, device),
            guesses=copy.copy(self.guess_strategy),
            tokens=zeros(batch, width),
            block=zeros(batch, n),
            lengths=zeros(batch, dtype=torch.int32),
            limits=zeros(batch, dtype=torch.int32),
            done=zeros(batch, dtype=torch.bool),
            eos_ids=zeros(eos_slots),
            position_limit=zeros(batch),
            pad_lengths=zeros(batch),
            histogram=zeros(max(n, g + 1) + 1 if k else n + 1),
            verified_in_chunk=zeros(batch, dtype=torch.int32),
            lengths_before=zeros(batch, dtype=torch.int32),
            step=zeros(1),
            slot_offsets=torch.arange(n, device=device),
            pool=CandidatePool(batch, g, self.pool_buckets, self.pool_slots, device) if k else None,
            verified_row=zeros(batch, max(n, g + 1)) if k else None,
            candidate_wins=zeros(),
            log_blocks=zeros(max_steps, batch, n) if logging else None,
            log_lengths=zeros(max_steps, batch, dtype=torch.int32) if logging else None,
            log_accepted=zeros(max_steps, batch, dtype=torch.int32) if logging else None,
        )
        if settings.sampling is not None:
            # The previous step's distributions, one per block slot (memory: see jacobi_engine.sampling).
            state.proposal = zeros(batch, n, self.info.vocab_size, dtype=torch.float32)
            state.draft_sampled = zeros(batch, n, dtype=torch.bool)
            state.seed = zeros(1)
            state.sequence_ids = torch.arange(batch, device=device)
        processing = LogitsProcessing(spec, self.info.vocab_size, device) if spec is not None else None
        tree_mask, tree_depth = tree_layout(n, k, g, device) if k else (None, None)
        config = StepConfig(
            n,
            self.mode == "chunked",
            self.verify_backend,
            processing,
            candidates=k,
            candidate_len=g,
            tree_mask=tree_mask,
            tree_depth=tree_depth,
            sampling=settings.sampling,
            sampling_rule=self.sampling_rule,
        )
        entry = _StepCacheEntry(state, config)
        self._step_cache[key] = entry
        while len(self._step_cache) > MAX_CACHED_STEPS:
            self._step_cache.popitem(last=False)
        return entry

    def _seed_pool(self, state: StepState, width: int) -> None:
        """Empties the pool and fills it with the prompts' n-grams (once per call, before decoding)."""
        pool = state.pool
        pool.reset()
        g = self.candidate_len
        chunk = 64  # n-grams per insert: insert() compares every pair of one call
        for first in range(0, max(width - g, 0), chunk):
            columns = torch.arange(first, min(first + chunk, width - g), device=state.tokens.device)
            key_columns = columns[None, :].expand(state.tokens.shape[0], -1)
            keys, ngrams = ngrams_of(state.tokens, key_columns, g)
            pool.insert(keys, ngrams, key_columns >= state.pad_lengths[:, None])

    def _step(self, entry: _StepCacheEntry) -> None:
        if entry.compiled is not None:
            try:
                # A step that would recompile raises instead (see _compiled_steps): a graph that needs a
                # new compile at every step (for example a forward hook that counts calls in a Python
                # attribute, which dynamo bakes in and guards on) is worse than eager.
                entry.compiled(entry.state)
                return
            except Exception as error:
                if not is_step_compile_error(error):  # raised while compiling, before the step ran
                    raise
                entry.compiled, entry.compile_failed = None, abandon_compiled(error, self.model)
        decode_step(self._block_forward, entry.config, entry.state)

    def _compile(self, entry: _StepCacheEntry) -> float:
        """Compiles the entry's step (once per entry); returns the seconds it took (0 if already done)."""
        if entry.compiled is not None or entry.compile_failed is not None:
            return 0.0
        if entry.config.sampling is not None and entry.config.candidates:
            # Not verified: the compiled tree sampling step drew other tokens than the eager one with
            # top-k in one test, and whether that is rounding in the warpers was not established.
            entry.compile_failed = "sampling with candidates is decoded eagerly (compile=True does not cover it yet)"
            warnings.warn(
                f"compile=True: {entry.compile_failed}; its tokens follow the exact sampling rule as in eager mode",
                RuntimeWarning,
                stacklevel=4,
            )
            return 0.0
        # Static shapes only: the host-side bounds would be baked into the graph (and recompile it).
        self._unbound(entry.state)
        compiled = compile_step(self._block_forward, entry.config, tag=f"{id(entry):x}")
        entry.compiled, seconds, entry.compile_failed = first_compiled_call(
            compiled, entry.state, _snapshot, _restore, self.model
        )
        return seconds

    @staticmethod
    def _unbound(state: StepState) -> None:
        state.cache.kv_len_bound = None
        state.guesses.search_bound = None

    # -- generation ----------------------------------------------------------------------------
    def _run_eager(self, entry: _StepCacheEntry, max_steps: int, streamer, streamed: int, width: int) -> None:
        """Steps until every sequence is done, syncing with the host once per ``sync_every`` steps."""
        state = entry.state
        sync_every = 1 if streamer is not None else self.sync_every
        finished, longest, known = torch.stack(
            [state.done.all().to(torch.long), state.cache.cache_seqlens.max().long(), state.lengths.max().long()]
        ).tolist()
        if entry.compiled is not None:
            self._unbound(state)  # the prefill set a bound; the compiled step was traced without one
        with compiled_steps(entry.compiled is not None):
            self._steps_until_done(entry, max_steps, streamer, streamed, finished, longest, known, sync_every)

    def _steps_until_done(self, entry, max_steps, streamer, streamed, finished, longest, known, sync_every) -> None:
        state = entry.state
        taken = 0
        while not finished:
            if taken >= max_steps:  # pragma: no cover
                raise RuntimeError("Jacobi decoding did not finish within its step bound; this is a bug")
            steps = min(sync_every, max_steps - taken)
            if entry.compiled is None:
                # The torch attention path reads only cache rows below this bound, the n-gram lookup only
                # token columns below it (it must hold until the next sync): each step commits at most one
                # verified row and appends the whole token tree. A compiled step has static shapes.
                advance = max(self.block_size, self.candidate_len + 1) if self.candidates else self.block_size
                tree_tokens = self.block_size + self.candidates * self.candidate_len
                state.cache.kv_len_bound = longest + advance * (steps - 1) + tree_tokens
                state.guesses.search_bound = known + advance * steps
            for _ in range(steps):
                self._step(entry)
            taken += steps
            finished, longest, known = torch.stack(
                [state.done.all().to(torch.long), state.cache.cache_seqlens.max().long(), state.lengths.max().long()]
            ).tolist()
            if streamer is not None and known > streamed:  # batch 1: lengths.max() is row 0's
                streamer.put(state.tokens[0, streamed:known].cpu())
                streamed = known

    def _capture(self, entry: _StepCacheEntry) -> float:
        """Captures the entry's step in a CUDA graph (once per entry); returns the seconds it took.

        The warm-up steps (they also JIT-compile Triton kernels) run on a snapshot of the state,
        which is then restored, so set-up never advances decoding; the K/V they wrote lie past the
        committed lengths and are overwritten like any rejected guess.
        """
        if entry.graph is not None:
            return 0.0
        state = entry.state
        started = time.perf_counter()
        snapshot = _snapshot(state)
        self._unbound(state)  # the graph must not depend on a host-side bound
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), compiled_steps(entry.compiled is not None):
            for _ in range(2):
                self._step(entry)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), compiled_steps(entry.compiled is not None):
            self._step(entry)
        _restore(snapshot)
        torch.cuda.synchronize()
        entry.graph = graph
        return time.perf_counter() - started

    def _run_graph(self, entry: _StepCacheEntry, max_steps: int, streamer, streamed: int) -> None:
        """Replays the entry's graph, checking the done flags on the host every ``sync_every`` replays."""
        state = entry.state
        taken = 0
        while True:
            finished, known = torch.stack([state.done.all().to(torch.long), state.lengths[0].long()]).tolist()
            if streamer is not None and known > streamed:
                streamer.put(state.tokens[0, streamed:known].cpu())
                streamed = known
            if finished:
                return
            if taken >= max_steps:  # pragma: no cover
                raise RuntimeError("Jacobi decoding did not finish within its step bound; this is a bug")
            for _ in range(min(self.sync_every, max_steps - taken)):
                entry.graph.replay()
                taken += 1

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer=None,
        return_stats: bool = True,
        record_trajectory: bool = False,
        generation_config=None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        **generation_kwargs,
    ) -> JacobiOutput:
        """Generation by Jacobi iteration. Greedy (``do_sample=False``): token-identical to
        ``model.generate(do_sample=False)`` with the same settings. Sampling (``do_sample=True``):
        distributed exactly like ``model.generate(do_sample=True)``, the warpers ``temperature``,
        ``top_k``, ``top_p`` and ``min_p`` applied after the processors as HF orders them; the random
        numbers come from the engine's ``seed`` and each row's index, so the same seed and inputs
        give the same output and a row's tokens do not depend on the rest of its batch.
        ``do_sample`` and the warpers default to the model's ``generation_config`` (then HF's
        defaults: temperature 1.0, top_k 50, top_p 1.0), as in ``model.generate``.

        ``input_ids`` [B, P] (or [P]) int, left-padded when ``attention_mask`` [B, P] marks padding
        (without a mask, one is inferred from ``pad_token_id`` as HF does). Settings default to the
        model's ``generation_config`` (``generation_config=`` replaces it, keyword arguments such as
        ``repetition_penalty=`` override single fields), as in ``model.generate``: ``max_new_tokens=None``
        follows ``max_new_tokens``/``max_length`` there; ``eos_token_id`` may be a list and ``[]`` means
        "no EOS". The processors that change greedy output (``repetition_penalty``,
        ``no_repeat_ngram_size``, ``bad_words_ids``, ``min_length``/``min_new_tokens``,
        ``suppress_tokens``, ``begin_suppress_tokens``, ``forced_bos/eos_token_id``, ...) are applied to
        every block slot with its own prefix; any other setting that would change the output is refused.
        """
        input_ids = self._check_input_ids(input_ids)
        batch, width = input_ids.shape
        if not isinstance(return_stats, bool) or not isinstance(record_trajectory, bool):
            raise TypeError("return_stats and record_trajectory must be bools")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be a bool or None, got {type(do_sample).__name__}")
        for name, value in (("max_new_tokens", max_new_tokens), ("pad_token_id", pad_token_id)):
            _check_int(name, value, minimum=0, allow_none=True)
        overrides = dict(
            generation_kwargs,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
        )
        settings = resolve_generation(
            self.model,
            generation_config,
            overrides,
            prompt_width=width,
            vocab_size=self.info.vocab_size,
            max_positions=self.info.max_positions,
        )
        max_new_tokens = settings.max_new_tokens
        if settings.sampling is not None and self.candidates > MAX_SAMPLING_CANDIDATES:
            raise ValueError(
                f"do_sample=True verifies at most {MAX_SAMPLING_CANDIDATES} candidates per step "
                f"(csrc/sampling_verify.h kMaxTreeBranches), got candidates={self.candidates}"
            )
        explicit_pad = pad_token_id
        if explicit_pad is None:
            source = (
                generation_config if generation_config is not None else getattr(self.model, "generation_config", None)
            )
            explicit_pad = getattr(source, "pad_token_id", None)
        attention_mask = self._attention_mask(input_ids, attention_mask, settings, explicit_pad)
        prompt_lengths = attention_mask.sum(dim=1)
        longest = int(prompt_lengths.max())
        self._check_lengths(longest, width, max_new_tokens)
        if streamer is not None:
            if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
                raise TypeError("streamer must have put() and end() methods (transformers' streamer protocol)")
            if batch != 1:
                raise ValueError("streamer only supports batch size 1")

        device = input_ids.device
        n = self.block_size
        stats = JacobiStats(block_size=n, mode=self.mode) if return_stats else None
        if stats is not None:
            stats.accepted_histogram = [0] * (n + 1)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if max_new_tokens == 0:
            if streamer is not None:
                streamer.end()
            return JacobiOutput(input_ids.clone(), stats, [] if record_trajectory else None)

        pad_id = settings.pad_token_id
        needed = max(longest, width) + max_new_tokens
        capacity = self.max_seq_len if self.max_seq_len is not None else _capacity_bucket(needed)
        # Per-step logs (blocks, lengths, accepted counts) only when trajectories are asked for; the
        # counters of the stats (steps, histogram) are kept on the device by every step anyway.
        logging = record_trajectory
        eos_slots = max(4, len(settings.eos_ids))
        entry = self._entry(batch, capacity, eos_slots, settings, logging, device)
        state = entry.state
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        started = time.perf_counter()
        with jacobi_attention_enabled(self.model, state.cache, self.attention_backend):
            state.cache.reset()
            first_logits = self._prefill(state.cache, input_ids, attention_mask, prompt_lengths)
            state.cache.cache_seqlens.copy_(prompt_lengths.to(torch.int32))
            state.tokens.fill_(pad_id)
            state.tokens[:, :width] = input_ids
            pad_lengths = (attention_mask != 0).to(torch.int8).argmax(dim=1)
            state.pad_lengths.copy_(pad_lengths)
            if settings.sampling is not None:
                first_logits = first_logits.float()  # as HF: processed and sampled in float32
            if entry.config.processing is not None:
                cur_len = torch.full((batch, 1), width, dtype=torch.long, device=device)
                first_logits = entry.config.processing.apply(first_logits[:, None], state.tokens, cur_len, pad_lengths)
                first_logits = first_logits[:, 0]
            if settings.sampling is None:
                first = first_logits.argmax(dim=-1)
            else:
                state.seed.fill_(_int64(self.seed))
                state.draft_sampled.zero_()  # the first block's drafts are the strategy's guesses
                first_probs = settings.sampling.probabilities(first_logits)
                first = sampling.sample_tokens(first_probs, state.seed, state.sequence_ids)
            state.tokens[:, width] = first
            state.lengths.fill_(width + 1)
            state.limits.fill_(width + max_new_tokens)
            state.eos_ids.fill_(-1)
            if settings.eos_ids:
                state.eos_ids[: len(settings.eos_ids)] = torch.tensor(settings.eos_ids, device=device)
            state.done.copy_(torch.isin(first, state.eos_ids) | (max_new_tokens <= 1))
            # Slots past max_new_tokens are never emitted; with length-dependent RoPE they must not
            # push the forward's largest position past what HF's own decoding reaches.
            position_limit = torch.full_like(prompt_lengths, 2**62)
            if self.rope_switches:
                position_limit = (prompt_lengths + max_new_tokens - 2).clamp(min=0)
            if self.info.max_positions is not None:
                position_limit = position_limit.clamp(max=self.info.max_positions - 1)
            state.position_limit.copy_(position_limit)
            for buffer in (state.histogram, state.verified_in_chunk, state.step, state.candidate_wins):
                buffer.zero_()
            if state.pool is not None:
                self._seed_pool(state, width)
            prompt_starts = pad_lengths.to(torch.long)
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            state.guesses.start(state.tokens, prompt_starts, torch.full_like(prompt_starts, width), n, generator)
            state.block.copy_(state.guesses.fill())
            state.block[:, 0] = first
            state.guesses.refine(state.block, state.lengths, ~state.done)
            sync()
            prefill_done = time.perf_counter()
            if streamer is not None:
                streamer.put(first.cpu())
            max_steps = max_new_tokens + n
            capture_seconds = compile_seconds = 0.0
            if self.compile:
                compile_seconds = self._compile(entry)
            if self.cuda_graph:
                capture_seconds = self._capture(entry)
                capture_done = time.perf_counter()
                self._run_graph(entry, max_steps, streamer, width + 1)
            else:
                capture_done = time.perf_counter()
                self._run_eager(entry, max_steps, streamer, width + 1, width)
            sync()
            decode_done = time.perf_counter()
        if streamer is not None:
            streamer.end()

        lengths = state.lengths.tolist()
        generated = [length - width for length in lengths]
        columns = torch.arange(width + max(generated), device=device)
        result = state.tokens[:, : width + max(generated)]
        result = torch.where(columns[None, :] < state.lengths[:, None], result, pad_id)
        trajectories = None
        if logging:
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
        if stats is not None:
            histogram = state.histogram.tolist()
            histogram[0] = 0  # zeros are rows that had already finished, not forwards
            stats.forward_passes = 1 + int(state.step)
            stats.tokens_generated = sum(generated)
            stats.tokens_per_forward = stats.tokens_generated / (batch + sum(histogram))
            stats.accepted_histogram = histogram
            if trajectories is not None:
                stats.stationary_tokens = sum(count_stationary(t) for t in trajectories)
            stats.prefill_seconds = prefill_done - started
            stats.capture_seconds = capture_seconds
            stats.candidate_wins = int(state.candidate_wins)
            stats.compile_seconds = compile_seconds
            stats.decode_seconds = decode_done - capture_done
        return JacobiOutput(result, stats, trajectories if record_trajectory else None)


def _snapshot(state: StepState) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy) of every small piece of mutable step state, the guess strategy's included."""
    tensors = [
        state.tokens,
        state.block,
        state.lengths,
        state.done,
        state.histogram,
        state.verified_in_chunk,
        state.step,
        state.cache.cache_seqlens,
    ]
    tensors += [value for value in vars(state.guesses).values() if isinstance(value, torch.Tensor)]
    tensors += [tensor for tensor in (state.proposal, state.draft_sampled, state.candidate_wins) if tensor is not None]
    if state.pool is not None:  # warm-up steps insert n-grams too
        tensors += [state.pool.keys, state.pool.ngrams, state.pool.cursor]
    return [(tensor, tensor.clone()) for tensor in tensors]


def _restore(snapshot) -> None:
    for tensor, saved in snapshot:
        tensor.copy_(saved)


def _int64(value: int) -> int:
    """``value`` as a signed 64-bit int (the Philox key is its two's-complement bits)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def generate(model, input_ids: torch.Tensor, **kwargs) -> JacobiOutput:
    """One-call shortcut: ``JacobiEngine(model, <engine args>).generate(input_ids, <generate args>)``."""
    engine_keys = (
        "block_size",
        "mode",
        "init",
        "max_seq_len",
        "seed",
        "attention_backend",
        "verify_backend",
        "cuda_graph",
        "sync_every",
        "candidates",
        "candidate_len",
        "pool_buckets",
        "pool_slots",
        "sampling_rule",
        "compile",
    )
    engine_kwargs = {key: kwargs.pop(key) for key in engine_keys if key in kwargs}
    return JacobiEngine(model, **engine_kwargs).generate(input_ids, **kwargs)
