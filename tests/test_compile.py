"""JacobiEngine(compile=True): exactness against eager and HF greedy, one graph, no graph breaks,
no recompiles, and the eager fallbacks (a graph break; a step that would recompile at every step).

Each compiled case costs one inductor compile (~15-40 s on our 2-core CI machine), so only a few
tiny models are compiled: Llama (GQA, RoPE, SDPA path, ragged batch, sliding mode, random guesses)
and GPT-2 (learned positions, chunked mode, n-gram guesses, a repetition penalty).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from greedy_check import assert_matches_greedy, hf_greedy
from models import tiny_model
from torch._dynamo.utils import counters

from jacobi_engine import JacobiEngine

MAX_NEW = 24


def _dynamo_counts() -> dict:
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }


def _delta(before: dict) -> dict:
    now = _dynamo_counts()
    return {key: now[key] - before[key] for key in now}


def _prompts(vocab: int, seed: int, batch: int, width: int, ragged: bool):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, width), generator=gen)
    mask = torch.ones_like(input_ids)
    if ragged:
        mask[0, :3] = 0  # left padding
        input_ids[0, :3] = 0
    return input_ids, mask


CASES = [
    pytest.param("llama", dict(block_size=4, mode="sliding", init="random_prompt"), {}, 2, id="llama-sliding-random"),
    pytest.param(
        "gpt2",
        dict(block_size=5, mode="chunked", init="ngram"),
        dict(repetition_penalty=1.3),
        1,
        id="gpt2-chunked-ngram",
    ),
]


@pytest.mark.parametrize(("arch", "engine_args", "settings", "batch"), CASES)
def test_compiled_matches_eager_and_hf_greedy_without_recompiles(arch, engine_args, settings, batch):
    model = tiny_model(arch)
    vocab = model.config.vocab_size
    eager = JacobiEngine(model, **engine_args)
    compiled = JacobiEngine(model, compile=True, **engine_args)
    # Two calls sharing one step-cache key (same batch, capacity bucket, block, mode, processors),
    # with different prompts and widths.
    calls = [_prompts(vocab, seed=1, batch=batch, width=12, ragged=batch > 1)]
    calls.append(_prompts(vocab, seed=2, batch=batch, width=9, ragged=False))
    for number, (input_ids, mask) in enumerate(calls):
        kwargs = dict(attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=2, pad_token_id=0, **settings)
        expected = eager.generate(input_ids, **kwargs)
        before = _dynamo_counts()
        if number == 0:
            got = compiled.generate(input_ids, **kwargs)
            delta = _delta(before)
            # Exactly one graph, with no graph break.
            assert delta == {"graphs": 1, "breaks": 0}, delta
            assert got.stats.compile_seconds > 0
        else:
            # A later call with the same key reuses the graph: any recompile raises here.
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled.generate(input_ids, **kwargs)
            assert _delta(before) == {"graphs": 0, "breaks": 0}
            assert got.stats.compile_seconds == 0
        assert got.stats.forward_passes > 2  # decoding took several compiled steps
        entry = next(iter(compiled.cached_states()))
        assert entry.compiled is not None and entry.compile_failed is None
        assert torch.equal(got.sequences, expected.sequences), f"call {number}: compiled differs from eager"
        assert got.stats.accepted_histogram == expected.stats.accepted_histogram
        reference = model.generate(
            input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=MAX_NEW,
            eos_token_id=2,
            pad_token_id=0,
            **settings,
        )
        assert assert_matches_greedy(model, got.sequences, reference, input_ids, mask, 0) == 0


class _GraphBreakingLayer(torch.nn.Module):
    """A decoder layer wrapper whose forward breaks the graph (as a host-side probe would)."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def forward(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return self.inner(*args, **kwargs)


def test_model_that_cannot_compile_falls_back_to_eager_with_a_warning():
    model = tiny_model("llama")
    reference_ids, mask = _prompts(model.config.vocab_size, seed=3, batch=1, width=10, ragged=False)
    expected = hf_greedy(model, reference_ids, mask, MAX_NEW, 2, 0)
    model.model.layers[0] = _GraphBreakingLayer(model.model.layers[0])
    engine = JacobiEngine(model, block_size=4, compile=True)
    with pytest.warns(
        RuntimeWarning, match=r"could not be compiled.*decoding eagerly.*Reason: Unsupported: .*graph.break"
    ):
        out = engine.generate(reference_ids, max_new_tokens=MAX_NEW, eos_token_id=2, pad_token_id=0)
    entry = next(iter(engine.cached_states()))
    assert entry.compiled is None and "graph_break" in entry.compile_failed
    assert assert_matches_greedy(model, out.sequences, expected, reference_ids, mask, 0) == 0
    # The failure is remembered per entry: the next call neither retries nor warns again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = engine.generate(reference_ids, max_new_tokens=MAX_NEW, eos_token_id=2, pad_token_id=0)
    assert torch.equal(again.sequences, out.sequences)
    assert again.stats.compile_seconds == 0


def test_step_that_would_recompile_at_every_step_goes_eager_with_a_warning():
    """A forward hook that counts calls in a Python attribute is traced into the graph, which then
    guards on the count: every step would recompile. The engine must notice, warn and go eager."""
    model = tiny_model("llama")
    input_ids, mask = _prompts(model.config.vocab_size, seed=4, batch=1, width=10, ragged=False)
    expected = hf_greedy(model, input_ids, mask, MAX_NEW, 2, 0)

    class Counter:
        calls = 0

        def hook(self, module, args, output):
            self.calls += 1

    counter = Counter()
    model.register_forward_hook(counter.hook)
    engine = JacobiEngine(model, block_size=4, compile=True)
    with pytest.warns(RuntimeWarning, match=r"would recompile, decoding eagerly"):
        out = engine.generate(input_ids, max_new_tokens=MAX_NEW, eos_token_id=2, pad_token_id=0)
    entry = next(iter(engine.cached_states()))
    assert entry.compiled is None and entry.compile_failed
    assert assert_matches_greedy(model, out.sequences, expected, input_ids, mask, 0) == 0
    assert counter.calls >= out.stats.forward_passes  # the eager steps ran the hook


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="compile must be a bool"):
        JacobiEngine(tiny_model("llama"), compile="yes")


def test_compiled_sampling_step_draws_the_eager_tokens():
    """do_sample=True compiled: the warpers and the sampling verify op in one graph, no recompile,
    and the same tokens as the eager step (counter-based numbers; the same probabilities here)."""
    model = tiny_model("llama")
    input_ids, mask = _prompts(model.config.vocab_size, seed=3, batch=2, width=10, ragged=True)
    kwargs = dict(block_size=4, seed=5)
    settings = dict(attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=[], do_sample=True)
    settings.update(temperature=0.8, top_k=20, top_p=0.95)
    eager = JacobiEngine(model, **kwargs).generate(input_ids, **settings)
    before = _dynamo_counts()
    compiled = JacobiEngine(model, compile=True, **kwargs)
    got = compiled.generate(input_ids, **settings)
    assert _delta(before) == {"graphs": 1, "breaks": 0}
    entry = next(iter(compiled.cached_states()))
    assert entry.compiled is not None and entry.compile_failed is None
    assert torch.equal(got.sequences, eager.sequences)
    assert got.stats.accepted_histogram == eager.stats.accepted_histogram
    with torch.compiler.set_stance("fail_on_recompile"):
        again = compiled.generate(input_ids, **settings)
    assert torch.equal(again.sequences, eager.sequences)
