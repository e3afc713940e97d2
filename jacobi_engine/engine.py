"""The Jacobi decoding loop.

Per step, for a batch of sequences each with an n-token block ``[t0, g1, ..., g_{n-1}]``
(``t0`` known-correct, the rest guesses):

1. one model forward over the block, on top of the committed KV cache (the block's K/V are
   appended in place by the attention op);
2. ``ops.verify_and_commit``: argmax, the accepted count, appending verified tokens, EOS and
   length handling, advancing ``cache_seqlens`` and shifting in the next guesses, in one op;
3. the guess strategy may rewrite the unverified tail (n-gram lookup).

The fixed point of this iteration is exactly greedy autoregressive decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from jacobi_engine import ops
from jacobi_engine.attention import jacobi_attention_enabled
from jacobi_engine.cache import JacobiCache
from jacobi_engine.guesses import GuessStrategy, make_guess_strategy
from jacobi_engine.hf_compat import eos_ids_from, inspect_model, model_device
from jacobi_engine.trajectory import SequenceTrajectory, build_trajectories, count_stationary

MODES = ("sliding", "chunked")


@dataclass
class JacobiStats:
    """What one ``generate`` call did.

    ``forward_passes`` counts model calls, prefill included. ``tokens_per_forward`` is new tokens
    divided by per-sequence forwards (each sequence's prefill plus every decode forward it was
    still running in), so plain autoregressive decoding scores exactly 1.0.
    ``accepted_histogram[k]`` counts (sequence, decode forward) pairs that verified ``k`` tokens.
    ``stationary_tokens`` counts tokens that were already correct while an earlier slot was
    still wrong and kept their value until verified (CLLM's term).
    """

    block_size: int
    mode: str
    forward_passes: int = 0
    tokens_generated: int = 0
    tokens_per_forward: float = 0.0
    accepted_histogram: list[int] = field(default_factory=list)
    stationary_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

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


@dataclass
class _DecodeState:
    """Everything a decode step reads and writes: device tensors with fixed addresses and shapes."""

    cache: JacobiCache
    guesses: GuessStrategy
    block: torch.Tensor  # [B, n] int64, slot 0 known-correct
    out_tokens: torch.Tensor  # [B, max_new_tokens + n] int64 view into the sequences buffer
    n_generated: torch.Tensor  # [B] int32
    done: torch.Tensor  # [B] bool
    eos_ids: torch.Tensor  # [E] int64
    max_new_tokens: int
    max_steps: int
    histogram: torch.Tensor  # [n + 1] int64, accepted count per (sequence, forward)
    forwards: torch.Tensor  # () int64, decode forwards while any sequence was running
    step: torch.Tensor  # [1] int64, decode steps taken
    log_blocks: torch.Tensor | None  # [max_steps, B, n] blocks fed, when logging
    log_starts: torch.Tensor | None  # [max_steps, B] index of slot 0 in the generated tokens
    log_accepted: torch.Tensor | None  # [max_steps, B] accepted counts (0: finished)


def _check_int(name: str, value, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


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
            length and longer requests are refused; by default it is sized per request.
        seed: seeds the random initial guesses, so every call is reproducible.
        attention_backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`jacobi_engine.ops`).
        verify_backend: ``"auto"``, ``"native"`` (compiled op) or ``"torch"``.
        cuda_graph: capture the whole Jacobi step (model forward + verify/commit + guesses) in a
            CUDA graph once per ``generate`` and replay it (CUDA models only).
        sync_every: decode steps between host checks of the done flags (default 1, or 8 with
            ``cuda_graph``). Steps past the end are harmless no-ops for finished sequences.
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
    ):
        self.info = inspect_model(model)
        _check_int("block_size", block_size, minimum=1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_int("max_seq_len", max_seq_len, minimum=1, allow_none=True)
        if max_seq_len is not None and self.info.max_positions is not None and max_seq_len > self.info.max_positions:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {self.info.max_positions} positions")
        _check_int("seed", seed)
        if attention_backend not in ops.ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ops.ATTENTION_BACKENDS}, got {attention_backend!r}")
        if verify_backend not in ops.VERIFY_BACKENDS:
            raise ValueError(f"verify_backend must be one of {ops.VERIFY_BACKENDS}, got {verify_backend!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and model_device(model).type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {model_device(model)}")
        _check_int("sync_every", sync_every, minimum=1, allow_none=True)
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
        self._cache: JacobiCache | None = None

    # -- input validation ------------------------------------------------------------------
    def _validate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, streamer):
        device = model_device(self.model)
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
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
        _check_int("max_new_tokens", max_new_tokens, minimum=0)
        _check_int("pad_token_id", pad_token_id, minimum=0, allow_none=True)
        input_ids = input_ids.to(torch.long)
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.info.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids contains id {bad}, outside the vocabulary [0, {self.info.vocab_size})")

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                    f"shape {tuple(input_ids.shape)}"
                )
            if attention_mask.device != device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must contain only 0 and 1")
            attention_mask = attention_mask.to(torch.long)
            # Left padding only: each row is zeros then ones (what HF generate expects).
            if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError("attention_mask must be left-padded: each row zeros, then ones")
        prompt_lengths = attention_mask.sum(dim=1)
        if bool((prompt_lengths == 0).any()):
            raise ValueError("attention_mask has a row with no tokens: every prompt needs at least one")
        longest = int(prompt_lengths.max())
        needed = longest + max_new_tokens
        limit = self.info.max_positions
        if limit is not None and needed > limit:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} = {needed} exceeds the model's "
                f"{limit} positions"
            )
        if self.max_seq_len is not None and needed > self.max_seq_len:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} = {needed} exceeds "
                f"max_seq_len={self.max_seq_len}"
            )
        if streamer is not None:
            if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
                raise TypeError("streamer must have put() and end() methods (transformers' streamer protocol)")
            if input_ids.shape[0] != 1:
                raise ValueError("streamer only supports batch size 1")
        return input_ids, attention_mask, prompt_lengths

    # -- model plumbing ----------------------------------------------------------------------
    def _get_cache(self, batch: int, capacity: int, device: torch.device) -> JacobiCache:
        cache = self._cache
        if cache is None or cache.batch != batch or cache.capacity < capacity or cache.device != device:
            cache = JacobiCache(self.info.num_layers, batch, capacity, device)
            self._cache = cache
        cache.reset()
        return cache

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
        return output.logits, logits_to_keep is not None

    def _positions(self, cache_seqlens: torch.Tensor, n: int) -> torch.Tensor:
        positions = cache_seqlens.to(torch.long)[:, None] + torch.arange(n, device=cache_seqlens.device)
        if self.info.max_positions is not None:
            # Slots past the model's last position can only hold tokens beyond max_new_tokens
            # (validated), which are never emitted; clamp so learned position tables don't overflow.
            positions = positions.clamp(max=self.info.max_positions - 1)
        return positions

    def _prefill(self, cache: JacobiCache, input_ids, prompt_lengths) -> torch.Tensor:
        """Runs the prompts right-aligned into the cache; returns each prompt's next-token logits."""
        batch, width = input_ids.shape
        longest = int(prompt_lengths.max())
        columns = (width - prompt_lengths)[:, None] + torch.arange(longest, device=input_ids.device)
        prompt_tokens = input_ids.gather(1, columns.clamp(max=width - 1))  # [B, longest], right-padded
        positions = torch.arange(longest, device=input_ids.device)[None].expand(batch, -1)
        last = prompt_lengths - 1
        keep = torch.unique(last)
        cache.kv_len_bound = longest
        logits, kept = self._forward(cache, prompt_tokens, positions, logits_to_keep=keep)
        rows = torch.arange(batch, device=input_ids.device)
        if kept:
            return logits[rows, torch.searchsorted(keep, last)]
        return logits[rows, last]

    # -- generation ----------------------------------------------------------------------------
    def _decode_step(self, state: _DecodeState) -> None:
        """One Jacobi step on device tensors only: no host sync, no data-dependent shape.

        That is what lets the whole step (model forward included) be captured in a CUDA graph;
        tests/test_graph_safety.py checks it op by op on CPU.
        """
        if state.log_blocks is not None:
            state.log_blocks.index_copy_(0, state.step, state.block[None])
            state.log_starts.index_copy_(0, state.step, (state.n_generated - 1)[None])
        state.forwards += (~state.done).any()
        before = state.n_generated.clone()
        positions = self._positions(state.cache.cache_seqlens, self.block_size)
        logits, _ = self._forward(state.cache, state.block, positions)
        n_accepted = ops.verify_and_commit(
            logits,
            state.block,
            state.guesses.fill(),
            state.cache.cache_seqlens,
            state.out_tokens,
            state.n_generated,
            state.done,
            state.eos_ids,
            state.max_new_tokens,
            self.mode == "chunked",
            backend=self.verify_backend,
        )
        state.guesses.refine(state.block, state.n_generated, (state.n_generated > before) & ~state.done)
        state.histogram.scatter_add_(0, n_accepted.to(torch.long), torch.ones_like(n_accepted, dtype=torch.long))
        if state.log_accepted is not None:
            state.log_accepted.index_copy_(0, state.step, n_accepted[None])
        state.step += 1

    def _run_eager(self, state: _DecodeState, streamer) -> None:
        """Steps until every sequence is done, syncing with the host once per ``sync_every`` steps."""
        sync_every = 1 if streamer is not None else self.sync_every
        longest = int(state.cache.cache_seqlens.max())
        streamed = 1
        for first_step in range(0, state.max_steps, sync_every):
            steps = min(sync_every, state.max_steps - first_step)
            # The torch attention path reads only rows below this bound (it must hold until the next sync).
            state.cache.kv_len_bound = longest + self.block_size * steps
            for _ in range(steps):
                self._decode_step(state)
            finished, longest, generated = torch.stack(
                [
                    state.done.all().to(torch.long),
                    state.cache.cache_seqlens.max().to(torch.long),
                    state.n_generated[0].long(),
                ]
            ).tolist()
            if streamer is not None and generated > streamed:
                streamer.put(state.out_tokens[0, streamed:generated].cpu())
                streamed = generated
            if finished:
                return
        raise RuntimeError("Jacobi decoding did not finish within its step bound; this is a bug")  # pragma: no cover

    def _run_cuda_graph(self, state: _DecodeState, streamer) -> None:
        """Captures one step (forward + verify/commit + guesses) in a CUDA graph and replays it,
        checking the done flags on the host every ``sync_every`` replays."""
        state.cache.kv_len_bound = None  # the graph must not depend on a host-side bound
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up steps are real steps: they also JIT-compile Triton kernels
                self._decode_step(state)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step(state)
        streamed, taken = 1, 2
        while True:
            finished, generated = torch.stack([state.done.all().to(torch.long), state.n_generated[0].long()]).tolist()
            if streamer is not None and generated > streamed:
                streamer.put(state.out_tokens[0, streamed:generated].cpu())
                streamed = generated
            if finished:
                return
            if taken >= state.max_steps:
                raise RuntimeError(
                    "Jacobi decoding did not finish within its step bound; this is a bug"
                )  # pragma: no cover
            for _ in range(min(self.sync_every, state.max_steps - taken)):
                graph.replay()
                taken += 1

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer=None,
        return_stats: bool = True,
        record_trajectory: bool = False,
    ) -> JacobiOutput:
        """Greedy generation by Jacobi iteration; token-identical to ``model.generate(do_sample=False)``.

        ``input_ids`` [B, P] (or [P]) int, left-padded when ``attention_mask`` [B, P] marks padding.
        ``eos_token_id``/``pad_token_id`` default to the model's ``generation_config``; generation
        of a sequence stops after any id of the EOS list, or after ``max_new_tokens``.
        """
        input_ids, attention_mask, prompt_lengths = self._validate(
            input_ids, attention_mask, max_new_tokens, pad_token_id, streamer
        )
        generation_config = getattr(self.model, "generation_config", None)
        eos_list = eos_ids_from(eos_token_id, generation_config)
        if pad_token_id is None:
            pad_token_id = getattr(generation_config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos_list[0] if eos_list else 0
        device = input_ids.device
        batch, width = input_ids.shape
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

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        capacity = int(prompt_lengths.max()) + max_new_tokens + n
        if self.max_seq_len is not None:
            capacity = max(capacity, self.max_seq_len + n)
        cache = self._get_cache(batch, capacity, device)
        # Prompt (left-padded) then generated tokens; n slack columns let the verify op write a
        # whole block past max_new_tokens without clamping (the output is cut to size anyway).
        sequences = torch.full((batch, width + max_new_tokens + n), pad_token_id, dtype=torch.long, device=device)
        sequences[:, :width] = input_ids
        guesses = self.guess_strategy
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        guesses.start(sequences, width, prompt_lengths, n, generator)
        # Jacobi verifies at least one new token per forward, so a chunk converges within n
        # iterations: this bounds the number of steps in both modes (and sizes the step logs).
        max_steps = max_new_tokens + n
        logging = return_stats or record_trajectory

        started = time.perf_counter()
        with jacobi_attention_enabled(self.model, cache, self.attention_backend):
            first_logits = self._prefill(cache, input_ids, prompt_lengths)
            cache.cache_seqlens.copy_(prompt_lengths.to(torch.int32))
            first = first_logits.argmax(dim=-1)
            sequences[:, width] = first
            eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device)
            state = _DecodeState(
                cache=cache,
                guesses=guesses,
                block=guesses.fill().clone(),
                out_tokens=sequences[:, width:],
                n_generated=torch.ones(batch, dtype=torch.int32, device=device),
                done=torch.isin(first, eos_ids) | (max_new_tokens <= 1),
                eos_ids=eos_ids,
                max_new_tokens=max_new_tokens,
                max_steps=max_steps,
                histogram=torch.zeros(n + 1, dtype=torch.long, device=device),
                forwards=torch.zeros((), dtype=torch.long, device=device),
                step=torch.zeros(1, dtype=torch.long, device=device),
                log_blocks=torch.zeros((max_steps, batch, n), dtype=torch.long, device=device) if logging else None,
                log_starts=torch.zeros((max_steps, batch), dtype=torch.int32, device=device) if logging else None,
                log_accepted=torch.zeros((max_steps, batch), dtype=torch.int32, device=device) if logging else None,
            )
            state.block[:, 0] = first
            guesses.refine(state.block, state.n_generated, ~state.done)
            sync()
            prefill_done = time.perf_counter()
            if streamer is not None:
                streamer.put(first.cpu())
            if self.cuda_graph:
                self._run_cuda_graph(state, streamer)
            else:
                self._run_eager(state, streamer)
            sync()
            decode_done = time.perf_counter()
        if streamer is not None:
            streamer.end()

        lengths = state.n_generated.tolist()
        result = sequences[:, : width + max(lengths)].clone()
        trajectories = None
        if logging:
            steps_taken = int(state.step)
            final_tokens = [state.out_tokens[row, : lengths[row]].tolist() for row in range(batch)]
            trajectories = build_trajectories(
                state.log_blocks[:steps_taken],
                state.log_starts[:steps_taken],
                state.log_accepted[:steps_taken],
                final_tokens,
                prompt_lengths.tolist(),
            )
        if stats is not None:
            histogram = state.histogram.tolist()
            histogram[0] = 0  # zeros are rows that had already finished, not forwards
            stats.forward_passes = 1 + int(state.forwards)
            stats.tokens_generated = sum(lengths)
            stats.tokens_per_forward = stats.tokens_generated / (batch + sum(histogram))
            stats.accepted_histogram = histogram
            stats.stationary_tokens = sum(count_stationary(t) for t in trajectories)
            stats.prefill_seconds = prefill_done - started
            stats.decode_seconds = decode_done - prefill_done
        return JacobiOutput(result, stats, trajectories if record_trajectory else None)


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
    )
    engine_kwargs = {key: kwargs.pop(key) for key in engine_keys if key in kwargs}
    return JacobiEngine(model, **engine_kwargs).generate(input_ids, **kwargs)
