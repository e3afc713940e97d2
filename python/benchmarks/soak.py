"""Soak test: many mixed JacobiEngine calls, each checked against Hugging Face greedy decoding.

    python python/benchmarks/soak.py [--calls 1000] [--seed 0] [--json OUT.json] [--only INDEX]

Every call is drawn from its own seeded generator (``--only INDEX`` replays one call alone):

- engine calls: a tiny random model from tests/models.py, batch 1-8 ragged (left-padded with an
  ``attention_mask``), block 1-32, ``"sliding"``/``"chunked"``, init ``"random_prompt"``, ``"ngram"``
  or a custom ``GuessStrategy``, EOS on (the model's default or a random list) or off (``[]``),
  ``max_new_tokens`` 0-64, fresh or long-lived engines, both verify backends, the one-call shortcut.
  Most pass ``attention_mask``; some omit it with prompts free of the pad id, and a few omit it
  with prompts that contain it (reported apart under ``mask_omitted_with_pad``: HF infers the mask
  from ``pad_token_id`` there). Each output must equal ``model.generate(do_sample=False)`` with the
  same settings (fp32); a divergence passes only when tests/greedy_check.py proves it a float
  near-tie of the top-2 logits. HF refuses ``max_new_tokens=0``; there the expected output is the
  prompt itself.
- bad calls: each must raise ValueError or TypeError whose message names the bad argument.
- HF calls: plain ``model.generate`` on a fixed prompt per model must repeat its first output, and
  after every call each config of the model must have its attention implementation back.

RSS and the number of live tensors are sampled every ``--sample-every`` calls after
``gc.collect()``; after the warm-up both must stay flat (least-squares slope and range within the
tolerances below; the slopes only over 500+ calls, where one bounded step, such as an engine's
step cache replacing an entry by a slightly larger one, no longer reads as a trend). Prints a summary, writes JSON (command, machine, counts, timings, memory
trace, every failure with its call spec) and exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import random
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import psutil
import torch
import transformers

import jacobi_engine
from jacobi_engine import GuessStrategy, JacobiEngine, build_info
from jacobi_engine.config import EngineConfig

MAX_CACHED_STEPS = EngineConfig().max_cached_states

REPO = Path(__file__).resolve().parents[2]
VOCAB = 96
PAD = 0  # tests/models.py: pad 0, bos 1, eos 2
ARCHS = ("llama", "qwen2", "gpt2", "mistral_sliding", "gemma2", "opt", "gpt_neox")
MAX_NEW_TOKENS = 64
MAX_PROMPT = 20

# Flatness after warm-up. A leak of one small tensor per call shows as a slope of 1000 tensors per
# 1000 calls; the allocator's high-water mark may still move a little as new shapes arrive.
TENSOR_SLOPE_PER_1000 = 20.0
TENSOR_RANGE = 64
RSS_SLOPE_MIB_PER_1000 = 24.0
RSS_RANGE_MIB = 48.0
# Over a short window a few MiB of allocator high-water movement extrapolate to a large slope, so
# the RSS slope is judged only over at least this many calls (the range always is; leaked tensors
# are caught by the live-tensor count at any length).
RSS_SLOPE_MIN_WINDOW = 500


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_soak_{name}", REPO / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_models = _load("models")
greedy_check = _load("greedy_check")


class RepeatLastGuess(GuessStrategy):
    """A custom strategy: freed slots count up through the vocabulary (mostly tokens absent from the
    prompt), and after a commit the unverified tail repeats the newest token (looping models often do)."""

    name = "repeat_last"

    def __init__(self, offset: int):
        self.offset = offset

    def start(self, tokens, prompt_starts, prompt_ends, block_size, generator) -> None:
        super().start(tokens, prompt_starts, prompt_ends, block_size, generator)
        self.counter = self._keep("counter", torch.full((), self.offset, dtype=torch.long, device=tokens.device))
        self.columns = self._keep("columns", torch.arange(block_size, device=tokens.device))

    def fill(self) -> torch.Tensor:
        guesses = (self.counter + self.columns) % VOCAB
        self.counter += self.block_size
        return guesses[None].repeat(self.tokens.shape[0], 1)

    def refine(self, block, lengths, rows) -> None:
        block[:, 1:] = torch.where(rows[:, None], block[:, :1], block[:, 1:])


# -- call specs: plain JSON-able dicts, so a failure can be replayed from the report ---------------


def _prompts(rng: random.Random, batch: int, ragged: bool, low: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-padded token rows and their masks; padding holds the pad id, sometimes arbitrary ids."""
    lengths = [rng.randint(1, MAX_PROMPT) for _ in range(batch)]
    if not ragged:
        lengths = [lengths[0]] * batch
    width = max(lengths)
    garbage = rng.random() < 0.15
    ids, mask = [], []
    for length in lengths:
        pad = [rng.randint(0, VOCAB - 1) if garbage else PAD for _ in range(width - length)]
        ids.append(pad + [rng.randint(low, VOCAB - 1) for _ in range(length)])
        mask.append([0] * (width - length) + [1] * length)
    return ids, mask


def engine_spec(rng: random.Random) -> dict:
    arch = rng.choice(ARCHS)
    batch = rng.randint(1, 8)
    mask_kind = rng.choices(["explicit", "omitted_no_pad", "omitted_with_pad"], [80, 14, 6])[0]
    if mask_kind == "explicit":
        # Pad ids may appear inside the prompt here: with a mask given, they are ordinary tokens.
        ids, mask = _prompts(rng, batch, ragged=True, low=0)
    elif mask_kind == "omitted_no_pad":
        ids, mask = _prompts(rng, batch, ragged=False, low=1)
        mask = None
    else:
        ids, _ = _prompts(rng, max(batch, 2), ragged=True, low=1)
        if rng.random() < 0.3 or all(len(set(row)) == len(row) and PAD not in row for row in ids):
            row = ids[rng.randrange(len(ids))]
            row[rng.randrange(len(row))] = PAD  # a pad id inside a prompt: HF masks it
        mask = None
    eos_kind = rng.choice(["off", "default", "list"])
    eos = {"off": [], "default": None, "list": rng.sample(range(3, VOCAB), rng.randint(1, 3))}[eos_kind]
    max_new_tokens = 0 if rng.random() < 0.04 else rng.randint(1, MAX_NEW_TOKENS)
    init = rng.choice(["random_prompt", "ngram", "custom"])
    return dict(
        kind="engine",
        arch=arch,
        mask_kind=mask_kind,
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=PAD if rng.random() < 0.7 else None,
        engine=dict(
            block_size=rng.randint(1, 32),
            mode=rng.choice(["sliding", "chunked"]),
            init=init,
            init_offset=rng.randrange(VOCAB),
            seed=rng.randrange(2**31),
            verify_backend=rng.choice(["auto", "auto", "auto", "torch"]),
            candidates=rng.choice([0, 0, 0, 2, 4]),  # multi-candidate verification (the pool) in 2 of 5
            candidate_len=rng.randint(1, 6),
        ),
        long_lived=rng.random() < 0.25,  # reuse this model's long-lived engine (cache reuse across shapes)
        shortcut=rng.random() < 0.05,  # jacobi_engine.generate(model, ...)
        return_stats=rng.random() < 0.9,
        record_trajectory=rng.random() < 0.1,
    )


def _ids(rows=2, width=5, high=VOCAB):
    return torch.randint(3, high, (rows, width), generator=torch.Generator().manual_seed(rows * 31 + width))


class _Collector:
    def put(self, value):
        pass

    def end(self):
        pass


# (name, argument the message must name, engine kwargs, generate kwargs); generate kwargs override
# a valid call: input_ids [2, 5], max_new_tokens 4.
BAD_CALLS = [
    ("block_size 0", "block_size", dict(block_size=0), {}),
    ("block_size negative", "block_size", dict(block_size=-2), {}),
    ("block_size float", "block_size", dict(block_size=2.0), {}),
    ("block_size bool", "block_size", dict(block_size=True), {}),
    ("block_size str", "block_size", dict(block_size="16"), {}),
    ("mode", "mode", dict(mode="parallel"), {}),
    ("mode None", "mode", dict(mode=None), {}),
    ("init name", "init", dict(init="zeros"), {}),
    ("init int", "init", dict(init=3), {}),
    ("max_seq_len 0", "max_seq_len", dict(max_seq_len=0), {}),
    ("max_seq_len float", "max_seq_len", dict(max_seq_len=64.0), {}),
    ("max_seq_len too small", "max_seq_len", dict(max_seq_len=8), dict(max_new_tokens=4)),
    ("seed str", "seed", dict(seed="0"), {}),
    ("seed float", "seed", dict(seed=1.5), {}),
    ("attention_backend", "attention_backend", dict(attention_backend="cuda"), {}),
    ("verify_backend", "verify_backend", dict(verify_backend="fast"), {}),
    ("cuda_graph str", "cuda_graph", dict(cuda_graph="yes"), {}),
    ("cuda_graph on cpu", "cuda_graph", dict(cuda_graph=True), {}),
    ("sync_every 0", "sync_every", dict(sync_every=0), {}),
    ("float ids", "input_ids", {}, dict(input_ids=torch.rand(2, 5))),
    ("bool ids", "input_ids", {}, dict(input_ids=torch.ones(2, 5, dtype=torch.bool))),
    ("list ids", "input_ids", {}, dict(input_ids=[[3, 4, 5]])),
    ("3-D ids", "input_ids", {}, dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long))),
    ("empty ids", "input_ids", {}, dict(input_ids=torch.zeros(1, 0, dtype=torch.long))),
    ("empty batch", "input_ids", {}, dict(input_ids=torch.zeros(0, 5, dtype=torch.long))),
    ("id = vocab", "input_ids", {}, dict(input_ids=torch.tensor([[3, VOCAB]]))),
    ("id huge", "input_ids", {}, dict(input_ids=torch.tensor([[3, 2**40]]))),
    ("negative id", "input_ids", {}, dict(input_ids=torch.tensor([[3, -1]]))),
    ("meta ids", "input_ids", {}, dict(input_ids=torch.ones(2, 5, dtype=torch.long, device="meta"))),
    ("mask shape", "attention_mask", {}, dict(attention_mask=torch.ones(2, 4, dtype=torch.long))),
    ("mask values", "attention_mask", {}, dict(attention_mask=torch.full((2, 5), 2))),
    ("mask negative", "attention_mask", {}, dict(attention_mask=torch.full((2, 5), -1))),
    ("mask right-padded", "attention_mask", {}, dict(attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]))),
    ("mask empty row", "attention_mask", {}, dict(attention_mask=torch.tensor([[1] * 5, [0] * 5]))),
    ("mask list", "attention_mask", {}, dict(attention_mask=[[1] * 5] * 2)),
    ("max_new_tokens negative", "max_new_tokens", {}, dict(max_new_tokens=-1)),
    ("max_new_tokens float", "max_new_tokens", {}, dict(max_new_tokens=2.5)),
    ("max_new_tokens bool", "max_new_tokens", {}, dict(max_new_tokens=True)),
    ("max_new_tokens str", "max_new_tokens", {}, dict(max_new_tokens="8")),
    ("beyond positions", "max_new_tokens", {}, dict(max_new_tokens=10_000)),
    ("eos str", "eos_token_id", {}, dict(eos_token_id="2")),
    ("eos negative", "eos_token_id", {}, dict(eos_token_id=[-3])),
    ("eos float", "eos_token_id", {}, dict(eos_token_id=2.5)),
    ("eos bool", "eos_token_id", {}, dict(eos_token_id=True)),
    ("pad float", "pad_token_id", {}, dict(pad_token_id=1.0)),
    ("pad negative", "pad_token_id", {}, dict(pad_token_id=-1)),
    ("pad str", "pad_token_id", {}, dict(pad_token_id="0")),
    ("streamer protocol", "streamer", {}, dict(streamer=object())),
    ("streamer batch 2", "streamer", {}, dict(streamer=_Collector())),
]


def bad_spec(rng: random.Random) -> dict:
    return dict(kind="bad", arch=rng.choice(ARCHS), case=rng.randrange(len(BAD_CALLS)), long_lived=rng.random() < 0.5)


def draw_spec(seed: int, index: int) -> dict:
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices(["engine", "bad", "hf"], [72, 16, 12])[0]
    if kind == "engine":
        return engine_spec(rng)
    if kind == "bad":
        return bad_spec(rng)
    return dict(kind="hf", arch=rng.choice(ARCHS))


# -- running and checking ---------------------------------------------------------------------


def attn_implementations(model) -> list:
    """The attention implementation of every config object the model's modules hold."""
    seen, found = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            found.append(config._attn_implementation)
    return found


def inferred_mask(input_ids: torch.Tensor, pad_token_id: int | None, eos: list[int]) -> torch.Tensor:
    """HF's rule when generate gets no attention_mask: mask the pad id if it occurs and is no EOS."""
    if pad_token_id is not None and bool((input_ids == pad_token_id).any()) and pad_token_id not in eos:
        return (input_ids != pad_token_id).long()
    return torch.ones_like(input_ids)


def hf_generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    with torch.no_grad():
        return model.generate(input_ids, **kwargs)


class Soak:
    def __init__(self, archs=ARCHS, log=print):
        self.log = log
        self.models = {arch: tiny_models.tiny_model(arch, vocab_size=VOCAB) for arch in archs}
        self.attn = {arch: attn_implementations(model) for arch, model in self.models.items()}
        self.long_lived: dict[str, JacobiEngine] = {}
        self.canaries = {}
        for arch, model in self.models.items():
            ids, mask = _prompts(random.Random(arch), 3, ragged=True, low=1)
            ids, mask = torch.tensor(ids), torch.tensor(mask)
            self.canaries[arch] = (ids, mask, hf_generate(model, ids, mask, 24, [], PAD))
            # Long-lived engines exist from the start, so their caches are part of the baseline. An
            # engine keeps up to MAX_CACHED_STEPS step-cache entries (one per batch / capacity / ...
            # key): fill them all now, so that later calls replace entries rather than add them.
            engine = self._long_lived_engine(arch)
            for batch in range(1, MAX_CACHED_STEPS + 2):
                for flags in (dict(return_stats=True), dict(return_stats=False, record_trajectory=False)):
                    engine.generate(
                        ids[:1].expand(batch, -1),
                        attention_mask=mask[:1].expand(batch, -1),
                        max_new_tokens=8,
                        eos_token_id=[],
                        **flags,
                    )

    def _long_lived_engine(self, arch: str) -> JacobiEngine:
        if arch not in self.long_lived:
            rng = random.Random(f"long-lived:{arch}")
            self.long_lived[arch] = JacobiEngine(
                self.models[arch],
                block_size=rng.randint(2, 16),
                mode=rng.choice(["sliding", "chunked"]),
                init=rng.choice(["random_prompt", "ngram"]),
                max_seq_len=rng.choice([None, 96]),
            )
        return self.long_lived[arch]

    def _check_attn(self, arch: str, after: str) -> str | None:
        now = attn_implementations(self.models[arch])
        if now != self.attn[arch]:
            return f"attention implementation not restored after {after}: {now} != {self.attn[arch]}"
        return None

    def run_engine(self, spec: dict) -> dict:
        arch = spec["arch"]
        model = self.models[arch]
        input_ids = torch.tensor(spec["input_ids"])
        mask = None if spec["attention_mask"] is None else torch.tensor(spec["attention_mask"])
        settings = spec["engine"]
        init = settings["init"] if settings["init"] != "custom" else RepeatLastGuess(settings["init_offset"])
        engine_kwargs = dict(
            block_size=settings["block_size"],
            mode=settings["mode"],
            init=init,
            seed=settings["seed"],
            verify_backend=settings["verify_backend"],
        )
        candidates, candidate_len = settings.get("candidates", 0), settings.get("candidate_len", 4)
        if settings["mode"] == "chunked":  # a branch verifies part of the chunk: at most block_size - 1 tokens
            candidate_len = min(candidate_len, settings["block_size"] - 1)
            candidates = candidates if candidate_len >= 1 else 0
        if candidates:
            engine_kwargs.update(candidates=candidates, candidate_len=max(candidate_len, 1))
        generate_kwargs = dict(
            attention_mask=mask,
            max_new_tokens=spec["max_new_tokens"],
            eos_token_id=spec["eos_token_id"],
            pad_token_id=spec["pad_token_id"],
            return_stats=spec["return_stats"],
            record_trajectory=spec["record_trajectory"],
        )
        long_lived = spec["long_lived"] and (
            self._long_lived_engine(arch).max_seq_len is None
            or input_ids.shape[1] + spec["max_new_tokens"] <= self._long_lived_engine(arch).max_seq_len
        )
        started = time.perf_counter()
        try:
            if long_lived:
                out = self._long_lived_engine(arch).generate(input_ids, **generate_kwargs)
            elif spec["shortcut"]:
                out = jacobi_engine.generate(model, input_ids, **engine_kwargs, **generate_kwargs)
            else:
                out = JacobiEngine(model, **engine_kwargs).generate(input_ids, **generate_kwargs)
        except (ValueError, TypeError) as error:
            # Documented refusals of an inferred mask: holes on a sliding-window / chunked model, or a
            # prompt ending in the pad id (HF would predict from a masked position).
            documented = ("sliding-window or chunked", "right padding")
            if spec["mask_kind"] == "omitted_with_pad" and any(text in str(error) for text in documented):
                return dict(outcome="refused_documented", error=f"{type(error).__name__}: {error}", seconds=0.0)
            return dict(outcome="refused", error=f"{type(error).__name__}: {error}", seconds=0.0)
        engine_seconds = time.perf_counter() - started

        pad = PAD if spec["pad_token_id"] is None else spec["pad_token_id"]
        eos = spec["eos_token_id"] if spec["eos_token_id"] is not None else [model.generation_config.eos_token_id]
        started = time.perf_counter()
        if spec["max_new_tokens"] == 0:
            expected = input_ids  # HF refuses max_new_tokens=0; "nothing new" is the prompt
        else:
            expected = hf_generate(model, input_ids, mask, spec["max_new_tokens"], spec["eos_token_id"], pad)
        hf_seconds = time.perf_counter() - started
        result = dict(engine_seconds=engine_seconds, hf_seconds=hf_seconds, long_lived=long_lived)
        width = input_ids.shape[1]
        result["eos_rows"] = sum(1 for row in expected[:, width:].tolist() if any(token in eos for token in row))
        check_mask = mask if mask is not None else inferred_mask(input_ids, pad, eos)
        try:
            if spec["max_new_tokens"] == 0:
                assert torch.equal(out.sequences, expected), "max_new_tokens=0 must return the prompt unchanged"
                near_ties = 0
            else:
                near_ties = greedy_check.assert_matches_greedy(
                    model, out.sequences, expected, input_ids, check_mask, pad
                )
        except AssertionError as error:
            result.update(
                outcome="mismatch",
                error=str(error),
                engine=out.sequences[:, width:].tolist(),
                hf=expected[:, width:].tolist(),
            )
            return result
        result.update(outcome="near_tie" if near_ties else "equal", near_tie_rows=near_ties)
        return result

    def run_bad(self, spec: dict) -> dict:
        name, argument, engine_overrides, generate_overrides = BAD_CALLS[spec["case"]]
        model = self.models[spec["arch"]]
        kwargs = dict(input_ids=_ids(), max_new_tokens=4, eos_token_id=[])
        kwargs.update(generate_overrides)
        try:
            if engine_overrides:
                JacobiEngine(model, **engine_overrides).generate(**kwargs)
            elif spec["long_lived"]:
                self._long_lived_engine(spec["arch"]).generate(**kwargs)
            else:
                JacobiEngine(model, block_size=4).generate(**kwargs)
        except (ValueError, TypeError) as error:
            message = f"{type(error).__name__}: {error}"
            if argument not in str(error):
                return dict(outcome="wrong_message", case=name, argument=argument, error=message)
            return dict(outcome="raised", case=name, error=message)
        except Exception as error:  # noqa: BLE001 -- any other exception type is the failure we look for
            return dict(outcome="wrong_exception", case=name, error=f"{type(error).__name__}: {error}")
        return dict(outcome="accepted", case=name, argument=argument)

    def run_hf(self, spec: dict) -> dict:
        model = self.models[spec["arch"]]
        ids, mask, expected = self.canaries[spec["arch"]]
        started = time.perf_counter()
        again = hf_generate(model, ids, mask, 24, [], PAD)
        seconds = time.perf_counter() - started
        if not torch.equal(again, expected):
            return dict(outcome="hf_changed", seconds=seconds, expected=expected.tolist(), got=again.tolist())
        return dict(outcome="equal", seconds=seconds)

    def run(self, spec: dict) -> dict:
        result = {"engine": self.run_engine, "bad": self.run_bad, "hf": self.run_hf}[spec["kind"]](spec)
        problem = self._check_attn(spec["arch"], spec["kind"] + " call")
        if problem:
            result["attn_not_restored"] = problem
        return result


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch module objects warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value against call index, per 1000 calls."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 1000 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var


FAILING_OUTCOMES = {"mismatch", "refused", "wrong_message", "wrong_exception", "accepted", "hf_changed"}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "jacobi_engine": build_info(),
    }


def run_soak(calls: int = 1000, seed: int = 0, sample_every: int = 10, warmup: int | None = None, only=None, log=print):
    """Runs the soak; returns the report (a JSON-able dict). ``only``: replay these call indices alone."""
    transformers.logging.set_verbosity_error()
    warmup = max(20, calls // 5) if warmup is None else warmup
    indices = list(range(calls)) if only is None else list(only)
    started = time.perf_counter()
    soak = Soak(log=log)
    setup_seconds = time.perf_counter() - started
    counts: Counter = Counter()
    outcomes: Counter = Counter()
    seconds: Counter = Counter()
    failures, mask_omitted_with_pad, near_ties = [], [], []
    eos_rows = rows = 0
    trace = [dict(call=0, rss_mib=round(rss_mib(), 2), live_tensors=live_tensors())]
    loop_started = time.perf_counter()
    for done, index in enumerate(indices, 1):
        spec = draw_spec(seed, index)
        call_started = time.perf_counter()
        result = soak.run(spec)
        seconds[f"{spec['kind']}_calls_seconds"] += time.perf_counter() - call_started
        counts[spec["kind"]] += 1
        counts[f"{spec['kind']}/{spec['arch']}"] += 1
        outcome = result["outcome"]
        outcomes[f"{spec['kind']}/{outcome}"] += 1
        if spec["kind"] == "engine":
            settings = spec["engine"]
            for key in (
                f"mode/{settings['mode']}",
                f"init/{settings['init']}",
                f"mask/{spec['mask_kind']}",
                "eos/off" if spec["eos_token_id"] == [] else "eos/on",
                "max_new_tokens/0" if spec["max_new_tokens"] == 0 else "max_new_tokens/1-64",
                f"batch/{len(spec['input_ids'])}",
                "block/1" if settings["block_size"] == 1 else "block/2-32",
                "engine/long_lived" if result.get("long_lived") else "engine/fresh",
                f"verify_backend/{settings['verify_backend']}",
                f"candidates/{settings.get('candidates', 0)}",
            ):
                counts[key] += 1
            eos_rows += result.get("eos_rows", 0)
            rows += len(spec["input_ids"])
            seconds["engine_generate_seconds"] += result.get("engine_seconds", 0.0)
            seconds["hf_reference_seconds"] += result.get("hf_seconds", 0.0)
        record = dict(index=index, spec=spec, result=result)
        if spec["kind"] == "engine" and spec["mask_kind"] == "omitted_with_pad":
            mask_omitted_with_pad.append(dict(index=index, outcome=outcome, error=result.get("error")))
        if outcome == "near_tie":
            near_ties.append(dict(index=index, arch=spec["arch"], rows=result["near_tie_rows"]))
        if outcome in FAILING_OUTCOMES or "attn_not_restored" in result:
            failures.append(record)
            log(f"FAIL call {index} ({spec['kind']}/{spec['arch']}, {outcome}): {result.get('error', '')[:300]}")
        if done % sample_every == 0 or done == len(indices):
            trace.append(dict(call=done, rss_mib=round(rss_mib(), 2), live_tensors=live_tensors()))
        if done % 100 == 0:
            log(f"  {done}/{len(indices)} calls, {len(failures)} failures, {time.perf_counter() - loop_started:.1f} s")
    loop_seconds = time.perf_counter() - loop_started

    steady = [point for point in trace if point["call"] >= warmup]
    tensor_points = [(p["call"], p["live_tensors"]) for p in steady]
    rss_points = [(p["call"], p["rss_mib"]) for p in steady]
    memory = dict(
        warmup_calls=warmup,
        samples_after_warmup=len(steady),
        tensor_slope_per_1000_calls=round(slope_per_1000(tensor_points), 3),
        tensor_range=(max(v for _, v in tensor_points) - min(v for _, v in tensor_points)) if steady else 0,
        rss_slope_mib_per_1000_calls=round(slope_per_1000(rss_points), 3),
        rss_range_mib=round(max(v for _, v in rss_points) - min(v for _, v in rss_points), 2) if steady else 0.0,
        tolerances=dict(
            tensor_slope_per_1000_calls=TENSOR_SLOPE_PER_1000,
            tensor_range=TENSOR_RANGE,
            rss_slope_mib_per_1000_calls=RSS_SLOPE_MIB_PER_1000,
            rss_range_mib=RSS_RANGE_MIB,
            rss_slope_min_window_calls=RSS_SLOPE_MIN_WINDOW,
        ),
    )
    window = steady[-1]["call"] - steady[0]["call"] if steady else 0
    memory["rss_slope_judged"] = memory["tensor_slope_judged"] = window >= RSS_SLOPE_MIN_WINDOW
    memory_flat = len(steady) < 3 or (
        (not memory["tensor_slope_judged"] or abs(memory["tensor_slope_per_1000_calls"]) <= TENSOR_SLOPE_PER_1000)
        and memory["tensor_range"] <= TENSOR_RANGE
        and memory["rss_range_mib"] <= RSS_RANGE_MIB
        and (not memory["rss_slope_judged"] or abs(memory["rss_slope_mib_per_1000_calls"]) <= RSS_SLOPE_MIB_PER_1000)
    )
    memory["flat"] = memory_flat
    return dict(
        command=" ".join([sys.executable, *sys.argv]),
        machine=machine(),
        config=dict(calls=calls, seed=seed, sample_every=sample_every, only=only, archs=list(ARCHS), vocab=VOCAB),
        counts=dict(sorted(counts.items())),
        outcomes=dict(sorted(outcomes.items())),
        engine_rows=rows,
        engine_rows_that_hit_eos=eos_rows,
        near_ties=near_ties,
        mask_omitted_with_pad=mask_omitted_with_pad,
        failures=failures,
        timings=dict(
            setup_seconds=round(setup_seconds, 3),
            loop_seconds=round(loop_seconds, 3),
            **{key: round(value, 3) for key, value in sorted(seconds.items())},
        ),
        memory=memory,
        memory_trace=trace,
        passed=not failures and memory_flat,
    )


def print_summary(report: dict, log=print) -> None:
    counts, outcomes, memory = report["counts"], report["outcomes"], report["memory"]
    log(f"calls: engine {counts.get('engine', 0)}, bad {counts.get('bad', 0)}, hf {counts.get('hf', 0)}")
    log("outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    log(
        "engine calls by: "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if "/" in k and not k.startswith(("engine/", "bad", "hf")))
    )
    log(f"engine rows {report['engine_rows']}, rows whose HF output hit an EOS {report['engine_rows_that_hit_eos']}")
    flagged = Counter(item["outcome"] for item in report["mask_omitted_with_pad"])
    log(f"mask omitted, pad id in prompt (HF infers the mask): {dict(flagged)}")
    log(f"near-tie divergences accepted: {len(report['near_ties'])}")
    log(
        f"memory after {memory['warmup_calls']} warm-up calls ({memory['samples_after_warmup']} samples): "
        f"live tensors slope {memory['tensor_slope_per_1000_calls']:+.1f}/1000 calls, range {memory['tensor_range']}; "
        f"RSS slope {memory['rss_slope_mib_per_1000_calls']:+.1f} MiB/1000 calls, range {memory['rss_range_mib']} MiB "
        f"-> {'flat' if memory['flat'] else 'NOT FLAT'}"
    )
    timings = report["timings"]
    log("time: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    log(f"failures: {len(report['failures'])} -> {'PASS' if report['passed'] else 'FAIL'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-every", type=int, default=10, help="calls between memory samples")
    parser.add_argument("--warmup", type=int, default=None, help="calls before memory must be flat (default 20%%)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="replay these call indices alone")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run_soak(args.calls, args.seed, args.sample_every, args.warmup, args.only)
    print_summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
