"""Statistics, trajectories and streaming of JacobiEngine.generate."""

from __future__ import annotations

import pytest
import torch
from models import tiny_model

from jacobi_engine import JacobiEngine
from jacobi_engine.trajectory import JacobiStep, SequenceTrajectory, count_stationary

VOCAB = 96


def prompt(batch=1, width=10, seed=0):
    return torch.randint(3, VOCAB, (batch, width), generator=torch.Generator().manual_seed(seed))


def test_autoregressive_stats_are_exact():
    model = tiny_model("llama", vocab_size=VOCAB)
    out = JacobiEngine(model, block_size=1).generate(prompt(), max_new_tokens=17, eos_token_id=[])
    stats = out.stats
    assert stats.forward_passes == 17  # prefill + 16 decode forwards, like HF greedy
    assert stats.tokens_generated == 17
    assert stats.tokens_per_forward == 1.0
    assert stats.accepted_histogram == [0, 16]
    assert stats.stationary_tokens is None  # counted from the step logs, kept only with record_trajectory=True
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0


def test_jacobi_stats_are_consistent():
    model = tiny_model("qwen2", vocab_size=VOCAB)
    input_ids = prompt(batch=3, seed=2)
    out = JacobiEngine(model, block_size=6).generate(input_ids, max_new_tokens=40, eos_token_id=[])
    stats = out.stats
    histogram = stats.accepted_histogram
    assert len(histogram) == 7 and histogram[0] == 0
    sequence_forwards = 3 + sum(histogram)
    assert stats.tokens_generated == 3 * 40
    assert abs(stats.tokens_per_forward - 120 / sequence_forwards) < 1e-12
    # Each decode forward verifies k tokens and the prefill yields one, so the histogram accounts
    # for every token (the last step may be cut at max_new_tokens).
    verified = 3 + sum(k * count for k, count in enumerate(histogram))
    assert 120 <= verified < 120 + 3 * 6
    assert stats.forward_passes <= 40


def _argmax_after(model, tokens: list[int]) -> list[int]:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].argmax(-1).tolist()


def test_chunked_trajectory_is_the_jacobi_iteration():
    """Every recorded state maps to the next by one Jacobi update, computed here with a plain HF forward."""
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids = prompt(batch=2, seed=5)
    n = 5
    out = JacobiEngine(model, block_size=n, mode="chunked").generate(
        input_ids, max_new_tokens=23, eos_token_id=[], record_trajectory=True
    )
    assert out.trajectories is not None and len(out.trajectories) == 2
    checked = 0
    for row, trajectory in enumerate(out.trajectories):
        generated = out.sequences[row, input_ids.shape[1] :].tolist()
        assert trajectory.tokens == generated
        blocks = trajectory.blocks()
        assert [b.start for b in blocks] == list(range(0, 23, n))[: len(blocks)]
        for block in blocks:
            assert block.fixed_point == generated[block.start : block.start + n]
            context = input_ids[row].tolist() + generated[: block.start]
            for state, next_state in zip(block.states, block.states[1:]):
                assert next_state[0] == state[0] == generated[block.start]
                predictions = _argmax_after(model, context + state)[len(context) : len(context) + n - 1]
                assert next_state[1:] == predictions
                checked += 1
            if len(block.fixed_point) == n:
                assert block.states[-1] == block.fixed_point  # the last iteration verified the fixed point
    assert checked > 0


def test_sliding_trajectory_steps():
    model = tiny_model("llama", vocab_size=VOCAB)
    out = JacobiEngine(model, block_size=4).generate(
        prompt(), max_new_tokens=20, eos_token_id=[], record_trajectory=True
    )
    trajectory = out.trajectories[0]
    generated = out.sequences[0, 10:].tolist()
    starts = [step.start for step in trajectory.steps]
    assert starts == sorted(starts) and starts[0] == 0
    for step, following in zip(trajectory.steps, trajectory.steps[1:]):
        assert step.guesses[0] == generated[step.start]
        assert following.start == step.start + step.n_accepted  # sliding: every forward commits
        assert step.guesses[: step.n_accepted] == generated[step.start : step.start + step.n_accepted]


def test_count_stationary_by_hand():
    # Final tokens 10..17. Step 1: block at 0 = [10, 99, 12, 13], slot 1 wrong, so slots 2 and 3 are
    # correct but unverified. Step 2 (start 1, after accepting 1): [11, 12, 13, 98] verifies 3 tokens;
    # positions 2 and 3 were waiting correct -> 2 stationary tokens. Position 1 was wrong before -> not.
    trajectory = SequenceTrajectory(
        prompt_length=4,
        tokens=[10, 11, 12, 13, 14, 15, 16, 17],
        steps=[
            JacobiStep(start=0, guesses=[10, 99, 12, 13], n_accepted=1),
            JacobiStep(start=1, guesses=[11, 12, 13, 98], n_accepted=3),
            # Step 3 guesses nothing right beyond slot 0, so position 6, verified by step 4, is not stationary.
            JacobiStep(start=4, guesses=[14, 97, 15, 0], n_accepted=1),
            JacobiStep(start=5, guesses=[15, 16, 96, 0], n_accepted=2),
        ],
    )
    assert count_stationary(trajectory) == 2


def test_stationary_tokens_reported():
    model = tiny_model("llama", vocab_size=VOCAB)
    out = JacobiEngine(model, block_size=8, mode="chunked").generate(
        prompt(batch=2), max_new_tokens=32, eos_token_id=[], record_trajectory=True
    )
    assert out.stats.stationary_tokens == sum(count_stationary(t) for t in out.trajectories)


def test_streamer_receives_every_token_once():
    model = tiny_model("llama", vocab_size=VOCAB)

    class Collector:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    collector = Collector()
    input_ids = prompt()
    out = JacobiEngine(model, block_size=5).generate(input_ids, max_new_tokens=21, eos_token_id=[], streamer=collector)
    assert collector.ended
    assert collector.chunks[0] == input_ids[0].tolist()  # HF streamers get the prompt first
    streamed = [token for chunk in collector.chunks[1:] for token in chunk]
    assert streamed == out.sequences[0, 10:].tolist()


def test_text_streamer_works(capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TextStreamer

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")), unk_token="w1"
    )
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = tiny_model("llama", vocab_size=VOCAB)
    out = JacobiEngine(model, block_size=4).generate(
        prompt(), max_new_tokens=12, eos_token_id=[], streamer=TextStreamer(tokenizer, skip_prompt=True)
    )
    printed = capsys.readouterr().out.split()
    assert printed == tokenizer.convert_ids_to_tokens(out.sequences[0, 10:].tolist())


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("mode", ["sliding", "chunked"])
@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_stats_against_forward_hooks_and_hf(mode, block_size):
    """forward_passes is what a forward hook counts; the histogram sums to the new tokens after
    prefill (HF's own output gives the token count), in both modes and with EOS inside blocks."""
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids = prompt(batch=3, seed=11)
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0
    expected = model.generate(
        input_ids, attention_mask=mask, do_sample=False, max_new_tokens=30, eos_token_id=[7, 9], pad_token_id=0
    )
    new_tokens = [row[input_ids.shape[1] :].tolist() for row in expected]
    # Tokens HF generated per row: up to and including the first EOS.
    counts = [next((i + 1 for i, t in enumerate(row) if t in (7, 9)), len(row)) for row in new_tokens]
    engine = JacobiEngine(model, block_size=block_size, mode=mode)  # construction may probe the model
    calls, handle = _count_forwards(model)
    try:
        out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[7, 9])
    finally:
        handle.remove()
    stats = out.stats
    assert stats.forward_passes == len(calls)
    assert stats.tokens_generated == sum(counts)
    histogram = stats.accepted_histogram
    assert sum(k * count for k, count in enumerate(histogram)) == sum(counts) - 3
    assert histogram[0] == 0 and all(count >= 0 for count in histogram)
    assert sum(histogram) <= 3 * (len(calls) - 1)  # at most every row in every decode forward


def test_single_sequence_histogram_counts_every_decode_forward():
    model = tiny_model("qwen2", vocab_size=VOCAB)
    for mode in ("sliding", "chunked"):
        engine = JacobiEngine(model, block_size=6, mode=mode)
        calls, handle = _count_forwards(model)
        try:
            out = engine.generate(prompt(seed=4), max_new_tokens=33, eos_token_id=[])
        finally:
            handle.remove()
        assert sum(out.stats.accepted_histogram) == len(calls) - 1  # one (sequence, forward) pair per decode forward
        assert sum(k * c for k, c in enumerate(out.stats.accepted_histogram)) == 32


def test_no_decode_forward_when_prefill_finishes_everything():
    model = tiny_model("llama", vocab_size=VOCAB)
    engine = JacobiEngine(model, block_size=4)
    calls, handle = _count_forwards(model)
    try:
        out = engine.generate(prompt(batch=2), max_new_tokens=1, eos_token_id=[])
    finally:
        handle.remove()
    assert len(calls) == 1 and out.stats.forward_passes == 1
    assert out.stats.tokens_generated == 2 and sum(out.stats.accepted_histogram) == 0


def test_step_cache_reuses_state_across_calls():
    """Requests with the same (batch, capacity bucket, block, mode) key reuse one step-cache entry (its
    buffers keep their addresses, as a captured CUDA graph needs), and stay exact; others get their own."""
    model = tiny_model("llama", vocab_size=VOCAB)
    engine = JacobiEngine(model, block_size=5)
    outputs = []
    for seed, width, max_new in ((0, 10, 20), (1, 13, 17), (2, 9, 30)):
        input_ids = prompt(batch=2, width=width, seed=seed)
        out = engine.generate(input_ids, max_new_tokens=max_new, eos_token_id=[])
        expected = model.generate(input_ids, do_sample=False, max_new_tokens=max_new, eos_token_id=[], pad_token_id=0)
        assert torch.equal(out.sequences, expected)
        (entry,) = engine.cached_states()
        outputs.append((entry, entry.state.tokens.data_ptr(), entry.state.cache.layer(0)[0].data_ptr()))
    assert all(item == outputs[0] for item in outputs[1:])
    engine.generate(prompt(batch=3), max_new_tokens=5, eos_token_id=[])  # another batch size: a new entry
    assert len(engine.cached_states()) == 2
    for batch in range(4, 10):
        engine.generate(prompt(batch=batch), max_new_tokens=3, eos_token_id=[])
    assert len(engine.cached_states()) <= 4  # bounded: old entries (and their caches) are released
