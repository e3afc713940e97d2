"""The engine's settings: :class:`EngineConfig`, frozen and checked once, and the one ``check_int``.

Every ``JacobiEngine(model, **settings)`` keyword is a field here; :func:`split_engine_kwargs` sorts
a mixed keyword dict into engine settings and generate arguments (the ``generate()`` shortcut, the
``model.generate`` integration and the server use it, so no caller re-lists the fields).

Bounds: ``block_size`` and ``candidates`` are bounded (:data:`MAX_BLOCK_SIZE`, :data:`MAX_CANDIDATES`,
:data:`MAX_CANDIDATE_LEN`), so that a typo cannot ask for terabytes: a decode step allocates
``B x (n + k*g)`` scores of the vocabulary and, with ``record_trajectory``, logs ``steps x B x n``
tokens. With ``do_sample=True`` the tree verifier handles at most ``ops.MAX_SAMPLING_CANDIDATES``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jacobi_engine.guesses import GuessStrategy
from jacobi_engine.ops import ATTENTION_BACKENDS, VERIFY_BACKENDS
from jacobi_engine.sampling import SAMPLING_RULES

MODES = ("sliding", "chunked")
MAX_BLOCK_SIZE = 1024
MAX_CANDIDATES = 64
MAX_CANDIDATE_LEN = 64
MAX_POOL_ENTRIES = 1 << 20  # pool_buckets * pool_slots per sequence


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False):
    """Raises TypeError unless ``value`` is an int (not a bool), ValueError unless it is in range."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


AUTO = "auto"


def int_or_auto(text: str):
    """A command line's ``--block-size`` / ``--candidates``: a number, or ``"auto"``."""
    return text if text == AUTO else int(text)


@dataclass(frozen=True)
class EngineConfig:
    """Settings of a :class:`~jacobi_engine.JacobiEngine` (see its docstring for each one)."""

    block_size: int | str | None = None  # None: "auto" in sliding mode, 16 in chunked mode (resolve_defaults)
    mode: str = "sliding"
    init: str | GuessStrategy | None = None  # None: "ngram" with block_size="auto", else "random_prompt"
    max_seq_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    verify_backend: str = "auto"
    cuda_graph: bool = False
    sync_every: int | None = None
    candidates: int | str | None = None  # None: "auto" with block_size="auto", else 0
    candidate_len: int = 4
    pool_buckets: int = 4096
    pool_slots: int = 8
    sampling_rule: str = "sjd"
    compile: bool = False
    max_cached_states: int = 4
    block_sizes: tuple[int, ...] | None = None  # what block_size="auto" chooses among
    candidate_counts: tuple[int, ...] | None = None  # what candidates="auto" chooses among
    cost_model: object | None = None  # a jacobi_engine.adaptive.CostModel, or the path of a saved one

    def __post_init__(self):
        self._resolve_defaults()
        if self.block_size != AUTO:
            check_int("block_size", self.block_size, minimum=1, maximum=MAX_BLOCK_SIZE)
        if self.candidates != AUTO:
            check_int("candidates", self.candidates, minimum=0, maximum=MAX_CANDIDATES)
        check_choice("mode", self.mode, MODES)
        if self.adaptive and self.mode == "chunked":
            raise ValueError(
                "block_size='auto' and candidates='auto' choose the step per sync, which chunked mode (a chunk "
                "iterated to its fixed point) does not allow: use mode='sliding'"
            )
        for name, values, low, high in (
            ("block_sizes", self.block_sizes, 1, MAX_BLOCK_SIZE),
            ("candidate_counts", self.candidate_counts, 0, MAX_CANDIDATES),
        ):
            if values is not None:
                if not isinstance(values, tuple) or not values:
                    raise TypeError(f"{name} must be a non-empty tuple of ints, got {values!r}")
                for value in values:
                    check_int(name, value, minimum=low, maximum=high)
        if self.cost_model is not None and not isinstance(self.cost_model, str):
            from jacobi_engine.adaptive import CostModel

            if not isinstance(self.cost_model, CostModel):
                raise TypeError(f"cost_model must be a CostModel or a path, got {type(self.cost_model).__name__}")
        if not isinstance(self.init, GuessStrategy) and self.init not in ("random_prompt", "ngram"):
            raise ValueError(f"init must be 'random_prompt', 'ngram' or a GuessStrategy instance, got {self.init!r}")
        check_int("max_seq_len", self.max_seq_len, minimum=1, allow_none=True)
        check_int("seed", self.seed)
        if not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits (torch.Generator), got {self.seed}")
        check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        check_choice("verify_backend", self.verify_backend, VERIFY_BACKENDS)
        check_bool("cuda_graph", self.cuda_graph)
        check_int("sync_every", self.sync_every, minimum=1, allow_none=True)
        check_int("candidate_len", self.candidate_len, minimum=1, maximum=MAX_CANDIDATE_LEN)
        check_int("pool_buckets", self.pool_buckets, minimum=1)
        check_int("pool_slots", self.pool_slots, minimum=1)
        if self.pool_buckets * self.pool_slots > MAX_POOL_ENTRIES:
            raise ValueError(
                f"pool_buckets * pool_slots = {self.pool_buckets * self.pool_slots} entries per sequence exceeds "
                f"{MAX_POOL_ENTRIES}"
            )
        if self.max_candidates > self.pool_slots:
            raise ValueError(
                f"candidates={self.max_candidates} exceeds pool_slots={self.pool_slots} (entries looked up per key)"
            )
        if self.candidates and self.mode == "chunked" and self.candidate_len > self.block_size - 1:
            raise ValueError(
                f"candidate_len={self.candidate_len} must be <= block_size - 1 = {self.block_size - 1} in chunked "
                "mode (a branch verifies part of the current chunk)"
            )
        check_choice("sampling_rule", self.sampling_rule, SAMPLING_RULES)
        check_bool("compile", self.compile)
        check_int("max_cached_states", self.max_cached_states, minimum=1)

    def _resolve_defaults(self) -> None:
        """Fills the settings left at None with the measured default (docs/decoding.md).

        Left out, ``block_size`` is ``"auto"`` in sliding mode, with ``candidates="auto"`` and n-gram
        guesses: the step shape chosen per sync from the measured costs, which ran above the previous
        default (a fixed 16-slot block with random prompt guesses) on SmolLM2 (float32, bfloat16) and
        the tiny GSM8K pair, and above HF greedy on each (README, "Results"). Chunked mode (a
        chunk iterated to its fixed point, the CLLM trajectory) keeps a fixed chunk of 16. A
        ``block_size`` given as a number keeps the fixed-step defaults: no candidates, random prompt
        guesses."""
        block_size = self.block_size
        if block_size is None:
            block_size = 16 if self.mode == "chunked" else AUTO
        candidates = self.candidates
        if candidates is None:
            candidates = AUTO if block_size == AUTO else 0
        init = self.init
        if init is None:
            init = "ngram" if block_size == AUTO or candidates == AUTO else "random_prompt"
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "candidates", candidates)
        object.__setattr__(self, "init", init)

    # -- derived sizes: each formula written once ------------------------------------------------
    @property
    def adaptive(self) -> bool:
        return self.block_size == AUTO or self.candidates == AUTO

    def shapes(self) -> list:
        """The step shapes (:class:`jacobi_engine.adaptive.Shape`) this engine may run: one, or the auto set."""
        from jacobi_engine import adaptive
        from jacobi_engine.adaptive import Shape

        graphs = self.compile or self.cuda_graph  # every shape compiled or captured: a small fixed set
        if self.block_size == AUTO:
            blocks = self.block_sizes or (adaptive.COMPILED_BLOCK_SIZES if graphs else adaptive.DEFAULT_BLOCK_SIZES)
        else:
            blocks = (self.block_size,)
        if self.candidates == AUTO:
            counts = self.candidate_counts or (adaptive.COMPILED_CANDIDATES if graphs else adaptive.DEFAULT_CANDIDATES)
        else:
            counts = (self.candidates,)
        return sorted({Shape(n, k, self.candidate_len if k else 0) for n in blocks for k in counts})

    @property
    def max_block_size(self) -> int:
        return max(shape.block for shape in self.shapes())

    @property
    def max_candidates(self) -> int:
        return max(shape.candidates for shape in self.shapes())

    @property
    def tree_tokens(self) -> int:
        """Tokens per decode forward (at most), and cache rows it appends: the block and every branch."""
        return max(shape.tokens for shape in self.shapes())

    @property
    def verified_width(self) -> int:
        """The longest row one step can verify: the block, or ``t0`` and a branch."""
        n, k = self.max_block_size, self.max_candidates
        return max(n, self.candidate_len + 1) if k else n

    @property
    def steps_between_syncs(self) -> int:
        return self.sync_every if self.sync_every is not None else (8 if self.cuda_graph else 1)

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)


ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def split_engine_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """``(engine settings, the rest)`` of a keyword dict."""
    engine = {key: value for key, value in kwargs.items() if key in ENGINE_FIELDS}
    rest = {key: value for key, value in kwargs.items() if key not in ENGINE_FIELDS}
    return engine, rest
