"""Continuous batching: every request's output equals HF greedy on it alone, whatever joins or leaves."""

from __future__ import annotations

import random

import pytest
import torch
from models import tiny_model

from jacobi_engine import JacobiEngine

VOCAB = 64


def hf_alone(model, prompt: list[int], max_new_tokens: int, eos) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(prompt) :].tolist()
    if eos is not None and eos != [] and eos in tokens:  # HF pads after EOS; the handle stops at it
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens


def random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # A small alphabet makes n-grams recur, so guesses and candidates do accept tokens.
    return [[rng.randrange(3, 12) for _ in range(rng.randrange(2, 14))] for _ in range(count)]


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        dict(block_size=4),
        dict(block_size=5, mode="chunked", init="ngram"),
        dict(block_size=4, init="ngram", candidates=2, candidate_len=3),
    ],
    ids=["sliding", "chunked-ngram", "candidates"],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_arrivals_match_hf_greedy_alone(arch, engine_kwargs):
    model = tiny_model(arch, vocab_size=VOCAB)
    engine = JacobiEngine(model, **engine_kwargs)
    scheduler = engine.scheduler(max_batch=3, max_seq_len=64, eos_token_id=2)
    prompts = random_prompts(9, seed=len(arch))
    rng = random.Random(1)
    lengths = [rng.randrange(1, 30) for _ in prompts]
    pending = list(range(len(prompts)))
    handles = {}
    rounds = 0
    while pending or scheduler.has_work:
        # Requests arrive at random step boundaries, sometimes several at once.
        for _ in range(rng.randrange(0, 3)):
            if pending:
                index = pending.pop(rng.randrange(len(pending)))
                handles[index] = scheduler.add_request(prompts[index], max_new_tokens=lengths[index])
        scheduler.step()
        rounds += 1
        assert rounds < 2000
    for index, handle in handles.items():
        expected = hf_alone(model, prompts[index], lengths[index], eos=2)
        assert handle.tokens == expected, f"request {index}"
        assert handle.finish_reason == ("stop" if expected[-1] == 2 else "length")
        assert 1 <= handle.forwards <= len(handle.tokens)


def test_cancel_frees_the_row_and_others_stay_exact():
    model = tiny_model("llama", vocab_size=VOCAB)
    engine = JacobiEngine(model, block_size=4)
    scheduler = engine.scheduler(max_batch=2, max_seq_len=80, eos_token_id=[])
    prompts = random_prompts(4, seed=7)
    first = scheduler.add_request(prompts[0], max_new_tokens=40)
    second = scheduler.add_request(prompts[1], max_new_tokens=12)
    waiting = scheduler.add_request(prompts[2], max_new_tokens=10)
    never = scheduler.add_request(prompts[3], max_new_tokens=10)
    scheduler.cancel(never)  # still waiting: never starts
    assert never.finish_reason == "cancelled" and never.tokens == []
    scheduler.step()
    scheduler.step()
    assert first.row is not None and waiting.row is None  # both rows busy, the third waits
    scheduler.cancel(first)
    scheduler.run()
    assert first.finish_reason == "cancelled"
    assert first.tokens == hf_alone(model, prompts[0], 40, eos=[])[: len(first.tokens)]
    assert len(first.tokens) < 40
    for handle, prompt, count in ((second, prompts[1], 12), (waiting, prompts[2], 10)):
        assert handle.tokens == hf_alone(model, prompt, count, eos=[])
        assert handle.finish_reason == "length"


def test_streamed_pieces_add_up_and_engine_level_api():
    model = tiny_model("llama", vocab_size=VOCAB)
    engine = JacobiEngine(model, block_size=4, init="ngram")
    pieces = []
    finished = []
    handle = engine.add_request(
        random_prompts(1, seed=3)[0],
        max_new_tokens=20,
        on_tokens=lambda h, new: pieces.append(list(new)),
        on_finish=finished.append,
    )
    while not handle.finished:
        engine.step()
    assert [t for piece in pieces for t in piece] == handle.tokens
    assert finished == [handle] and handle.wait(0)
    assert len(handle.tokens) <= 20


def test_bad_requests_are_refused_by_name():
    model = tiny_model("llama", vocab_size=VOCAB)
    scheduler = JacobiEngine(model, block_size=4).scheduler(max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        scheduler.add_request([5] * 20, max_new_tokens=20)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        scheduler.add_request([5, VOCAB + 3], max_new_tokens=4)
    with pytest.raises(TypeError, match="prompt must be"):
        scheduler.add_request([], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        scheduler.add_request([5, 6], max_new_tokens=0)
    with pytest.raises(ValueError, match="1-D"):
        scheduler.add_request(torch.ones(2, 3, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        JacobiEngine(model).scheduler(max_batch=0)
