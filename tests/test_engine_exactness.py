"""The engine's greedy output equals model.generate(do_sample=False), token for token, in fp32."""

from __future__ import annotations

import pytest
import torch
from greedy_check import assert_matches_greedy, hf_greedy
from models import ARCHITECTURES, tiny_model

from jacobi_engine import JacobiEngine, generate

VOCAB = 96
PAD = 0


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model(request):
    return tiny_model(request.param, vocab_size=VOCAB)


def prompts(batch: int, seed: int = 1, width: int = 12):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, width), generator=generator)
    mask = torch.ones_like(input_ids)
    if batch > 1:  # ragged, left-padded
        for row in range(1, batch):
            pad = (5 * row) % (width - 1)
            mask[row, :pad] = 0
            input_ids[row, :pad] = PAD
    return input_ids, mask


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "ragged3"])
@pytest.mark.parametrize("mode", ["sliding", "chunked"])
def test_matches_hf_greedy_all_block_sizes(model, batch, mode):
    input_ids, mask = prompts(batch)
    max_new_tokens = 29  # not a multiple of any block size below
    expected = hf_greedy(model, input_ids, mask, max_new_tokens, eos_token_id=[], pad_token_id=PAD)
    for block_size in (1, 4, 7, 16):
        engine = JacobiEngine(model, block_size=block_size, mode=mode)
        out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=[])
        assert out.sequences.shape[1] == input_ids.shape[1] + max_new_tokens
        ties = assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)
        assert ties <= 1, f"{ties} near-tie divergences at block_size={block_size}"


def _eos_splitting_prompts(model):
    """Prompts and an EOS id that the first row emits early while the second row does not emit it soon."""
    for seed in range(4, 40):
        input_ids, mask = prompts(3, seed=seed)
        free_run = hf_greedy(model, input_ids, mask, 40, eos_token_id=[], pad_token_id=PAD)[:, input_ids.shape[1] :]
        for position in range(3, 20):
            token = int(free_run[0, position])
            if token not in free_run[0, :position].tolist() and token not in free_run[1, : position + 10].tolist():
                return input_ids, mask, token, position
    raise AssertionError("no prompt set separates the rows of this random model")


@pytest.mark.parametrize("mode", ["sliding", "chunked"])
@pytest.mark.parametrize("init", ["random_prompt", "ngram"])
def test_eos_inside_block_for_one_sequence_while_others_go_on(model, mode, init):
    input_ids, mask, eos, position = _eos_splitting_prompts(model)
    expected = hf_greedy(model, input_ids, mask, 40, eos_token_id=eos, pad_token_id=PAD)
    for block_size in (4, 7):
        out = JacobiEngine(model, block_size=block_size, mode=mode, init=init).generate(
            input_ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=PAD
        )
        assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)
        generated = out.sequences[:, input_ids.shape[1] :]
        assert generated[0, position] == eos
        assert (generated[0, position + 1 :] == PAD).all()  # finished row padded
        assert out.sequences.shape[1] > input_ids.shape[1] + position + 1  # the others went on


def test_eos_list_and_model_defaults():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = prompts(2, seed=7)
    free_run = hf_greedy(model, input_ids, mask, 30, eos_token_id=[], pad_token_id=PAD)[:, input_ids.shape[1] :]
    eos_list = [int(free_run[0, 6]), int(free_run[1, 9])]
    expected = hf_greedy(model, input_ids, mask, 30, eos_token_id=eos_list, pad_token_id=PAD)
    out = generate(model, input_ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos_list, block_size=5)
    assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)
    assert out.sequences.shape[1] < input_ids.shape[1] + 30  # both stopped early

    # None -> generation_config defaults (eos 2, pad 0), exactly as HF's own defaults.
    model.generation_config.eos_token_id = eos_list[0]
    expected = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=30)
    out = JacobiEngine(model, block_size=4).generate(input_ids, attention_mask=mask, max_new_tokens=30)
    assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)


def test_max_new_tokens_edges():
    model = tiny_model("qwen2", vocab_size=VOCAB)
    input_ids, mask = prompts(2)
    engine = JacobiEngine(model, block_size=8)
    out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=0)
    assert torch.equal(out.sequences, input_ids)
    for max_new_tokens in (1, 2, 9):
        expected = hf_greedy(model, input_ids, mask, max_new_tokens, eos_token_id=[], pad_token_id=PAD)
        out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=[])
        assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)


def test_prompt_at_position_limit():
    """prompt + max_new_tokens == the model's positions: the block's slack slots must not overflow."""
    model = tiny_model("gpt2", vocab_size=VOCAB)  # learned positions, 256 of them
    input_ids = torch.randint(3, VOCAB, (1, 240), generator=torch.Generator().manual_seed(3))
    expected = hf_greedy(model, input_ids, None, 16, eos_token_id=[], pad_token_id=PAD)
    out = JacobiEngine(model, block_size=16).generate(input_ids, max_new_tokens=16, eos_token_id=[])
    assert_matches_greedy(model, out.sequences, expected, input_ids, None, PAD)


def test_engine_is_reusable_and_leaves_model_untouched():
    model = tiny_model("llama", vocab_size=VOCAB)
    implementation = model.config._attn_implementation
    input_ids, mask = prompts(3)
    engine = JacobiEngine(model, block_size=4, max_seq_len=64)
    first = engine.generate(input_ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[]).sequences
    single = engine.generate(input_ids[:1], max_new_tokens=20, eos_token_id=[]).sequences
    again = engine.generate(input_ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[]).sequences
    assert torch.equal(first, again)
    assert torch.equal(first[:1], single)
    assert model.config._attn_implementation == implementation
    expected = hf_greedy(model, input_ids, mask, 20, eos_token_id=[], pad_token_id=PAD)
    assert torch.equal(
        model.generate(
            input_ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=[], pad_token_id=PAD
        ),
        expected,
    )


def test_backends_agree():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = prompts(3)
    outputs = [
        JacobiEngine(model, block_size=6, verify_backend=backend).generate(
            input_ids, attention_mask=mask, max_new_tokens=25, eos_token_id=[5]
        )
        for backend in ("native", "torch")
    ]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[0].stats.accepted_histogram == outputs[1].stats.accepted_histogram


def test_finished_rows_stay_inside_the_cache():
    """Regression: a row finishing on max_new_tokens with a long accept kept advancing its cache
    length, and the next block of the still-running rows wrote past the cache."""
    model = tiny_model("gpt2", vocab_size=VOCAB)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 12), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    expected = hf_greedy(model, input_ids, mask, 40, eos_token_id=[], pad_token_id=PAD)
    for block_size in (4, 7, 16):
        engine = JacobiEngine(model, block_size=block_size)
        out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
        assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)
        (entry,) = engine.cached_states()
        # Every row emitted all 40 tokens; its cache holds the prompt and all but the last of them.
        assert entry.state.cache.cache_seqlens.tolist() == (mask.sum(1) + 40 - 1).tolist()
