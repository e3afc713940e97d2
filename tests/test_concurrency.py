"""Threads: one engine shared by threads, two engines on one model, and plain model.generate in another
thread while a Jacobi call runs. Every output equals HF greedy, and the model's attention setting is
never left changed."""

from __future__ import annotations

import threading

import pytest
import torch
from models import tiny_model

from jacobi_engine import JacobiEngine

VOCAB = 64
NEW = 16


def prompts(count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 14, (1, 4 + i % 5), generator=gen) for i in range(count)]


def hf_greedy(model, input_ids):
    return model.generate(input_ids, do_sample=False, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)


def run_threads(targets) -> None:
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def test_threads_sharing_one_engine_get_exact_outputs():
    model = tiny_model("llama", vocab_size=VOCAB)
    inputs = prompts(12)
    expected = [hf_greedy(model, ids) for ids in inputs]
    engine = JacobiEngine(model, block_size=4, init="ngram")
    results = {}

    def worker(first: int):
        for index in range(first, len(inputs), 4):
            results[index] = engine.generate(inputs[index], max_new_tokens=NEW, eos_token_id=[]).sequences

    run_threads([lambda first=first: worker(first) for first in range(4)])
    for index, want in enumerate(expected):
        assert torch.equal(results[index], want), f"call {index}"
    assert model.config._attn_implementation == "sdpa"


def test_two_engines_on_one_model_overlap_exactly():
    model = tiny_model("llama", vocab_size=VOCAB)
    inputs = prompts(2, seed=1)
    expected = [hf_greedy(model, ids) for ids in inputs]
    engines = [JacobiEngine(model, block_size=4), JacobiEngine(model, block_size=3, mode="chunked")]
    both_inside = threading.Barrier(2, timeout=60)
    results = {}

    def worker(index: int):
        waited = []

        def meet_the_other(entry, run_step):
            if not waited:  # both calls are inside a decode step at the same time, once
                waited.append(both_inside.wait())
            run_step()

        with engines[index].watch_steps(meet_the_other):
            results[index] = engines[index].generate(inputs[index], max_new_tokens=NEW, eos_token_id=[]).sequences

    run_threads([lambda: worker(0), lambda: worker(1)])
    for index, want in enumerate(expected):
        assert torch.equal(results[index], want)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_plain_generate_in_another_thread_during_a_jacobi_call(implementation):
    model = tiny_model("llama", vocab_size=VOCAB)
    model.set_attn_implementation(implementation)
    jacobi_ids, plain_ids = prompts(2, seed=2)
    # A ragged batch for the plain call: its mask must be built by the model's own implementation.
    plain_batch = torch.cat([plain_ids, plain_ids.flip(1)], dim=0)
    plain_mask = torch.ones_like(plain_batch)
    plain_mask[1, :2] = 0
    plain_batch[1, :2] = 0

    def plain_generate():
        return model.generate(
            plain_batch, attention_mask=plain_mask, do_sample=False, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0
        )

    expected_jacobi, expected_plain = hf_greedy(model, jacobi_ids), plain_generate()
    inside, plain_done = threading.Event(), threading.Event()
    results = {}
    switched_during = []

    def jacobi():
        def hold(entry, run_step):
            if not inside.is_set():
                inside.set()
                assert plain_done.wait(60)  # the plain call ran entirely while this call was switched in
            run_step()

        engine = JacobiEngine(model, block_size=4)
        with engine.watch_steps(hold):
            results["jacobi"] = engine.generate(jacobi_ids, max_new_tokens=NEW, eos_token_id=[]).sequences

    def plain():
        assert inside.wait(60)
        switched_during.append(model.config._attn_implementation)
        results["plain"] = plain_generate()
        plain_done.set()

    run_threads([jacobi, plain])
    assert switched_during == ["jacobi_engine"]  # the overlap really happened
    assert torch.equal(results["jacobi"], expected_jacobi)
    assert torch.equal(results["plain"], expected_plain)
    assert model.config._attn_implementation == implementation
