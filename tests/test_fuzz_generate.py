"""Fuzzing ``JacobiEngine(...)`` and ``generate(...)`` arguments with hypothesis.

Every argument is drawn either from its ordinary values or, now and then, from odd ones (wrong
types and dtypes, bools and floats for ints, None, out-of-vocabulary and negative ids, masks that
are not left-padded, empty rows or not 0/1, other devices, extreme lengths). An odd value puts its
argument's name on the draw's list of suspects. Each draw must then either

- return exactly what HF greedy ``model.generate(do_sample=False)`` returns for the same call
  (up to float near-ties, tests/greedy_check.py), or
- raise ValueError or TypeError whose message names one of the suspects,

and nothing else: another exception type, a refusal of an ordinary call, a refusal that names
another argument, or an output HF would not give fails; so does a draw that outlives its deadline.
Odd values that are still meaningful (int32 ids, a bool mask, ``max_new_tokens=None``, which
follows the model's generation_config like HF, a mask with holes) have an HF answer, and an engine
that accepts them must give it. The tests are split by argument group so that one engine gap does
not hide the others.
"""

from __future__ import annotations

import functools
import signal
from contextlib import contextmanager

import pytest
import torch
import transformers
from greedy_check import assert_matches_greedy
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from models import tiny_model

import jacobi_engine
from jacobi_engine import GuessStrategy, JacobiEngine

VOCAB = 96
PAD = 0  # tests/models.py: pad 0, bos 1, eos 2
ARCHS = ("llama", "gpt2")  # rotary positions and learned ones (256 positions)
DEADLINE_S = 30
MAX_WIDTH = 12


@functools.cache
def model_for(arch: str):
    transformers.logging.set_verbosity_error()
    return tiny_model(arch, vocab_size=VOCAB)


class EchoGuess(GuessStrategy):
    """A user strategy: guesses the prompt's first tokens again and again."""

    def fill(self) -> torch.Tensor:
        slots = torch.arange(self.block_size, device=self.tokens.device)[None]
        lengths = (self.prompt_ends - self.prompt_starts)[:, None]
        return self.tokens.gather(1, self.prompt_starts[:, None] + slots % lengths)


class Hang(Exception):
    pass


@contextmanager
def deadline(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"the call did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Odd values per argument. The hypothesis tests draw from these; test_every_odd_value runs each
# once in an otherwise ordinary call (hypothesis alone does not reach every one in a bounded run).
ODD_VALUES = {
    "block_size": [0, -1, 2.0, True, False, None, "4"],
    "mode": ["", "Sliding", None, 1],
    "init": ["zeros", None, 3, GuessStrategy],
    "seed": [-1, 2**64 - 1, 2**64, 2**70, -(2**70), "0", 1.5, None, True],
    "max_seq_len": [0, -5, 3, 12, 64.0, True, 513, 10**6],
    "verify_backend": ["cuda", None, ""],
    "attention_backend": ["cuda", None, ""],
    "cuda_graph": [True, 1, "yes", None],
    "sync_every": [0, -1, 2.0, True],
    # None follows the model's generation_config, as HF does: an engine must not refuse it.
    "max_new_tokens": [None, -1, -100, 2.5, True, False, "8", 10**6, 2**63],
    "eos_token_id": [-1, [-3], "2", 2.5, True, [2.0], [True], [[2]], {2}],
    "pad_token_id": [-1, 1.0, True, "0", [0], VOCAB + 10],
    "streamer": [object(), "stdout"],
}


def refusable(name: str, value) -> bool:
    return not (name == "max_new_tokens" and value is None)


ENGINE_ARGUMENTS = (
    "block_size",
    "mode",
    "init",
    "seed",
    "max_seq_len",
    "verify_backend",
    "attention_backend",
    "cuda_graph",
    "sync_every",
)
SCALAR_ARGUMENTS = ("max_new_tokens", "eos_token_id", "pad_token_id", "streamer")


class Draw:
    """The drawn call: engine and generate keyword arguments, the suspects and which argument may be odd."""

    def __init__(self, arch: str, odd: str | None):
        self.arch = arch
        self.odd = odd  # the one argument drawn from its odd values, "*" for any of them, None for none
        self.engine_kwargs: dict = {}
        self.generate_kwargs: dict = {}
        self.suspects: set[str] = set()
        self.shortcut = False

    def is_odd(self, draw, name: str) -> bool:
        if self.odd == "*":
            return draw(st.sampled_from([False] * 7 + [True]))
        return self.odd == name

    def __repr__(self) -> str:
        return (
            f"Draw(arch={self.arch}, engine={self.engine_kwargs}, generate={self.generate_kwargs}, "
            f"suspects={sorted(self.suspects)}, shortcut={self.shortcut})"
        )


def pick(draw, call: Draw, name: str, ordinary, odd, optional: bool = False):
    """Sets ``name`` to an ordinary value or, when it is the draw's odd argument, to an odd one (a suspect).
    An optional argument is sometimes left out (its default). Hypothesis shrinks toward the ordinary values."""
    if call.is_odd(draw, name):
        value = draw(odd)
        if refusable(name, value):
            call.suspects.add(name)
        return value
    if optional and draw(st.booleans()):
        return _OMIT
    return draw(ordinary)


_OMIT = object()


def _set(kwargs: dict, name: str, value) -> None:
    if value is not _OMIT:
        kwargs[name] = value


# -- engine arguments -------------------------------------------------------------------------


def draw_engine_kwargs(draw, call: Draw) -> None:
    kw = call.engine_kwargs
    ordinary = dict(
        block_size=st.integers(1, 40) | st.integers(250, 300),
        mode=st.sampled_from(["sliding", "chunked"]),
        init=st.sampled_from(["random_prompt", "ngram", "echo"]),
        seed=st.integers(0, 2**32),
        max_seq_len=st.sampled_from([None, 512 if call.arch == "llama" else 256, 200]),
        verify_backend=st.sampled_from(["auto", "native", "torch"]),
        attention_backend=st.sampled_from(["auto", "torch"]),  # Triton on CPU runs only under its slow interpreter
        cuda_graph=st.just(False),
        sync_every=st.sampled_from([None, 1, 3]),
    )
    for name in ENGINE_ARGUMENTS:
        optional = name not in ("block_size", "mode", "init")
        _set(kw, name, pick(draw, call, name, ordinary[name], st.sampled_from(ODD_VALUES[name]), optional))
    if kw.get("init") == "echo":
        kw["init"] = EchoGuess()


# -- input_ids and attention_mask -------------------------------------------------------------


def ordinary_ids(draw, batch: int, width: int, low: int = 1) -> torch.Tensor:
    values = draw(st.lists(st.integers(low, VOCAB - 1), min_size=batch * width, max_size=batch * width))
    return torch.tensor(values, dtype=torch.long).reshape(batch, width)


def draw_input_ids(draw, call: Draw) -> tuple[int, int]:
    """Sets generate_kwargs['input_ids']; returns the (batch, width) a mask must match."""
    batch, width = draw(st.integers(1, 4)), draw(st.integers(1, MAX_WIDTH))
    ids = ordinary_ids(draw, batch, width)
    if call.is_odd(draw, "input_ids"):
        call.suspects.add("input_ids")
        kind = draw(
            st.sampled_from(
                ["oov", "negative", "huge", "dtype", "float", "bool", "1-D", "3-D", "0-D", "empty", "list", "meta"]
            )
        )
        if kind == "oov":
            ids[draw(st.integers(0, batch - 1)), draw(st.integers(0, width - 1))] = draw(st.integers(VOCAB, VOCAB + 3))
        elif kind == "negative":
            ids[draw(st.integers(0, batch - 1)), draw(st.integers(0, width - 1))] = draw(st.integers(-3, -1))
        elif kind == "huge":
            ids[0, 0] = 2**40
        elif kind == "dtype":
            ids = ids.to(draw(st.sampled_from([torch.int32, torch.int16, torch.int8, torch.uint8])))
        elif kind == "float":
            ids = ids.to(draw(st.sampled_from([torch.float32, torch.float16, torch.complex64])))
        elif kind == "bool":
            ids = ids > 50
        elif kind == "1-D":
            batch, ids = 1, ids[0]
        elif kind == "3-D":
            ids = ids[None]
        elif kind == "0-D":
            ids = ids[0, 0]
        elif kind == "empty":
            batch, width = draw(st.sampled_from([(0, width), (batch, 0), (0, 0)]))
            ids = torch.zeros((batch, width), dtype=torch.long)
        elif kind == "list":
            ids = ids.tolist()
        else:
            ids = ids.to("meta")
    call.generate_kwargs["input_ids"] = ids
    return batch, width


def left_padded_mask(draw, batch: int, width: int) -> torch.Tensor:
    lengths = [draw(st.integers(1, width)) for _ in range(batch)] if width else []
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return mask


def draw_attention_mask(draw, call: Draw, batch: int, width: int) -> None:
    kwargs = call.generate_kwargs
    if not call.is_odd(draw, "attention_mask"):
        if draw(st.booleans()):
            kwargs["attention_mask"] = left_padded_mask(draw, batch, width)
        return  # or no mask: ordinary prompts hold no pad id, so HF's inferred mask is all ones
    kind = draw(
        st.sampled_from(
            ["none_with_pad", "right", "hole", "empty_row", "value2", "negative", "half", "bool", "float"]
            + ["shape", "list", "meta", "1-D"]
        )
    )
    if kind == "none_with_pad":
        # No mask, pad ids in the prompt: HF infers the mask from pad_token_id (left padding, or a pad
        # inside a prompt). An ordinary call: the engine must give HF's answer.
        ids = kwargs["input_ids"]
        usable = isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.numel() and ids.device.type == "cpu"
        if usable and not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool:
            mask = left_padded_mask(draw, batch, width)
            if draw(st.booleans()):
                mask[draw(st.integers(0, batch - 1)), draw(st.integers(0, width - 1))] = 0
            kwargs["input_ids"] = torch.where(mask.bool(), ids.to(torch.long), PAD).to(ids.dtype)
            if not bool(mask.any(dim=1).all()):
                # A prompt of pad ids only: HF's inferred mask has an empty row; refusing it is fine.
                call.suspects.update(("attention_mask", "pad_token_id"))
        return
    call.suspects.add("attention_mask")
    mask = left_padded_mask(draw, batch, width)
    if kind == "right":
        mask = mask.flip(1)
    elif kind == "hole" and width >= 3:
        mask[:, :] = 1
        mask[draw(st.integers(0, max(batch - 1, 0))), draw(st.integers(1, width - 2))] = 0
    elif kind == "empty_row" and batch:
        mask[draw(st.integers(0, batch - 1))] = 0
    elif kind == "value2":
        mask = mask * 2
    elif kind == "negative":
        mask = -mask
    elif kind == "half":
        mask = mask.float() * 0.5 + 0.5
    elif kind == "bool":
        mask = mask.bool()
    elif kind == "float":
        mask = mask.float()
    elif kind == "shape":
        mask = torch.ones((batch, width + 1), dtype=torch.long)
    elif kind == "list":
        mask = mask.tolist()
    elif kind == "meta":
        mask = mask.to("meta")
    elif kind == "1-D" and batch == 1:
        mask = mask[0]
    kwargs["attention_mask"] = mask


# -- lengths and special tokens -----------------------------------------------------------------


def draw_generate_scalars(draw, call: Draw, batch: int) -> None:
    kw = call.generate_kwargs
    odd = {name: st.sampled_from(ODD_VALUES[name]) for name in SCALAR_ARGUMENTS}
    kw["max_new_tokens"] = pick(draw, call, "max_new_tokens", st.integers(0, 40), odd["max_new_tokens"])
    eos = st.sampled_from([None, [], 2, 7, [7, 11], (5,), VOCAB + 4]) | st.lists(
        st.integers(3, VOCAB - 1), min_size=1, max_size=3
    )
    _set(kw, "eos_token_id", pick(draw, call, "eos_token_id", eos, odd["eos_token_id"], optional=True))
    pads = st.sampled_from([None, PAD])
    _set(kw, "pad_token_id", pick(draw, call, "pad_token_id", pads, odd["pad_token_id"], optional=True))
    if call.is_odd(draw, "streamer"):
        kw["streamer"] = draw(odd["streamer"] | st.builds(Collector))
        if not isinstance(kw["streamer"], Collector) or batch != 1:
            call.suspects.add("streamer")  # not the protocol, or streaming a batch
    elif batch == 1 and draw(st.integers(0, 4)) == 0:
        kw["streamer"] = Collector()
    kw["return_stats"] = draw(st.booleans())
    kw["record_trajectory"] = draw(st.booleans())


class Collector:
    """transformers' streamer protocol, collecting what is streamed."""

    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


@st.composite
def calls(draw, odd_arguments: tuple[str, ...]):
    """One call; at most one argument (from ``odd_arguments``, or "*" for any number of any) is odd."""
    odd = draw(st.sampled_from([None, *odd_arguments]))
    call = Draw(draw(st.sampled_from(ARCHS)), odd)
    draw_engine_kwargs(draw, call)
    batch, width = draw_input_ids(draw, call)
    draw_attention_mask(draw, call, batch, width)
    draw_generate_scalars(draw, call, batch)
    call.shortcut = draw(st.integers(0, 9)) == 0
    return call


# -- the oracle -------------------------------------------------------------------------------


def hf_call(model, call: Draw):
    """HF greedy for the same call, in the form HF takes (long ids, 2-D, 0/1 long mask, list EOS)."""
    kw = call.generate_kwargs
    ids = kw["input_ids"]
    if ids.dim() == 1:
        ids = ids[None]
    ids = ids.to(torch.long)
    mask = kw.get("attention_mask")
    if mask is not None:
        mask = (mask[None] if mask.dim() == 1 else mask).to(torch.long)
    hf_kwargs = dict(do_sample=False)
    if mask is not None:
        hf_kwargs["attention_mask"] = mask
    if kw.get("max_new_tokens") is not None:
        hf_kwargs["max_new_tokens"] = kw["max_new_tokens"]
    eos = kw.get("eos_token_id")
    if eos is not None:
        hf_kwargs["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
    if kw.get("pad_token_id") is not None:
        hf_kwargs["pad_token_id"] = kw["pad_token_id"]
    pad = kw.get("pad_token_id")
    pad = model.generation_config.pad_token_id if pad is None else pad
    eos_list = eos if eos is not None else [model.generation_config.eos_token_id]
    eos_list = [eos_list] if isinstance(eos_list, int) else list(eos_list)
    if mask is None:  # HF's inference rule: mask the pad id when it occurs and is no EOS
        if bool((ids == pad).any()) and pad not in eos_list:
            check_mask = (ids != pad).long()
        else:
            check_mask = torch.ones_like(ids)
    else:
        check_mask = mask
    if kw.get("max_new_tokens") == 0:
        return ids, check_mask, pad  # HF refuses max_new_tokens=0; nothing new is the prompt
    with torch.no_grad():
        return model.generate(ids, **hf_kwargs), check_mask, pad


def note(outcome: str) -> None:
    """Counts outcomes in hypothesis' statistics (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(outcome)


def run_and_check(call: Draw) -> None:
    model = model_for(call.arch)
    attn_before = model.config._attn_implementation
    try:
        with deadline(DEADLINE_S):
            if call.shortcut:
                kwargs = {**call.engine_kwargs, **call.generate_kwargs}
                out = jacobi_engine.generate(model, kwargs.pop("input_ids"), **kwargs)
            else:
                out = JacobiEngine(model, **call.engine_kwargs).generate(**call.generate_kwargs)
    except (ValueError, TypeError) as error:
        assert call.suspects, f"an ordinary call was refused: {type(error).__name__}: {error}\n{call}"
        named = [name for name in call.suspects if name in str(error)]
        assert named, f"the error names none of {sorted(call.suspects)}: {type(error).__name__}: {error}\n{call}"
        note(f"refused, naming {sorted(named)}")
        return
    finally:
        assert model.config._attn_implementation == attn_before, "attention implementation not restored"
    try:
        expected, check_mask, pad = hf_call(model, call)
    except Exception as error:  # noqa: BLE001 -- any refusal by HF makes the engine's answer unverifiable
        pad = call.generate_kwargs.get("pad_token_id")
        if isinstance(pad, int) and pad >= VOCAB and isinstance(error, IndexError):
            return  # HF embeds its out-of-vocabulary pad id once a row finishes and fails: no answer to compare
        pytest.fail(f"the engine accepted a call HF refuses ({type(error).__name__}: {error})\n{call}")
    note("compared with HF" + (f" (suspects {sorted(call.suspects)})" if call.suspects else ""))
    ids = expected[:, : check_mask.shape[1]]
    if call.generate_kwargs.get("max_new_tokens") == 0:
        assert torch.equal(out.sequences, expected), f"max_new_tokens=0 must return the prompt\n{call}"
    else:
        assert_matches_greedy(model, out.sequences, expected, ids, check_mask, pad)
    streamer = call.generate_kwargs.get("streamer")
    if isinstance(streamer, Collector):
        assert streamer.ended
        assert sum(streamer.chunks, []) == out.sequences[0].tolist(), "streamed tokens differ from the output"


FUZZ_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=300, **FUZZ_SETTINGS)
@given(call=calls(ENGINE_ARGUMENTS))
def test_fuzz_engine_arguments(call):
    run_and_check(call)


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(call=calls(("input_ids",) * 4))
def test_fuzz_input_ids(call):
    run_and_check(call)


@settings(max_examples=150, **FUZZ_SETTINGS)
@given(call=calls(("attention_mask",) * 4))
def test_fuzz_attention_mask(call):
    run_and_check(call)


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(call=calls(SCALAR_ARGUMENTS))
def test_fuzz_lengths_and_special_tokens(call):
    run_and_check(call)


@settings(max_examples=150, **FUZZ_SETTINGS)
@given(call=calls(("*",)))
def test_fuzz_everything_at_once(call):
    run_and_check(call)


def _odd_cases():
    for name, values in ODD_VALUES.items():
        for value in values:
            yield pytest.param(name, value, id=f"{name}={value!r}"[:60])


@pytest.mark.parametrize("name, value", list(_odd_cases()))
def test_every_odd_value(name, value):
    """Each odd value once, in an otherwise ordinary call (a ragged batch with its mask)."""
    call = Draw("llama", name)
    if refusable(name, value):
        call.suspects.add(name)
    ids = torch.tensor([[0, 0, 5, 9, 14], [3, 8, 21, 30, 44]])
    call.engine_kwargs = dict(block_size=4)
    call.generate_kwargs = dict(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=6, eos_token_id=[])
    target = call.engine_kwargs if name in ENGINE_ARGUMENTS else call.generate_kwargs
    target[name] = value
    run_and_check(call)
