"""Statistics, trajectories and streaming of JacobiEngine.generate."""

from __future__ import annotations

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
    assert stats.stationary_tokens == 0
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
