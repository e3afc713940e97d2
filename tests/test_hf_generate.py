"""model.generate(custom_generate=jacobi_engine.hf.generate): HF's preparation, Jacobi decoding."""

from __future__ import annotations

import pytest
import torch
from models import tiny_model
from sampling_stats import exact_distribution, goodness_of_fit, hf_processors
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

import jacobi_engine.hf
from jacobi_engine import JacobiStats

VOCAB = 64


def ragged_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (3, 11), generator=gen)
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    input_ids[mask == 0] = 0
    return input_ids, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize(
    "settings",
    [dict(block_size=4), dict(block_size=6, init="ngram", candidates=2, candidate_len=3)],
    ids=["plain", "pool"],
)
def test_ragged_batch_is_token_identical_to_greedy(arch, settings):
    model = tiny_model(arch, vocab_size=VOCAB)
    input_ids, mask = ragged_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=24, pad_token_id=0, eos_token_id=2)
    expected = model.generate(input_ids, do_sample=False, **kwargs)
    got = model.generate(input_ids, custom_generate=jacobi_engine.hf.generate, **settings, **kwargs)
    assert torch.equal(got, expected)


def test_generation_config_setting_and_return_dict():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = ragged_batch(1)
    config = GenerationConfig(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2, pad_token_id=0)
    expected = model.generate(input_ids, attention_mask=mask, generation_config=config, do_sample=False)
    out = model.generate(
        input_ids,
        attention_mask=mask,
        generation_config=config,
        custom_generate=jacobi_engine.hf.generate,
        block_size=5,
        return_dict_in_generate=True,
    )
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, expected)
    assert isinstance(out.jacobi_stats, JacobiStats) and out.jacobi_stats.block_size == 5
    assert out.jacobi_stats.tokens_generated > 0


def test_streamer_receives_the_prompt_once_then_the_tokens():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))

    class Recorder:
        def __init__(self):
            self.pieces, self.ended = [], 0

        def put(self, value):
            self.pieces.append(value.flatten().tolist())

        def end(self):
            self.ended += 1

    reference, ours = Recorder(), Recorder()
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=15, eos_token_id=[], streamer=reference)
    got = model.generate(
        input_ids, custom_generate=jacobi_engine.hf.generate, max_new_tokens=15, eos_token_id=[], streamer=ours
    )
    assert torch.equal(got, expected)
    assert ours.pieces[0] == reference.pieces[0] == input_ids[0].tolist()
    assert sum(ours.pieces[1:], []) == sum(reference.pieces[1:], []) == expected[0, 7:].tolist()
    assert ours.ended == reference.ended == 1


def test_engine_is_cached_per_model_and_settings():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        model.generate(input_ids, custom_generate=jacobi_engine.hf.generate, block_size=4, max_new_tokens=8)
    first = jacobi_engine.hf.engine_for(model, block_size=4)
    assert len(first.cached_states()) == 1  # the second call reused the first call's state
    assert jacobi_engine.hf.engine_for(model, block_size=4) is first
    assert jacobi_engine.hf.engine_for(model, block_size=3) is not first


def test_sampling_matches_hf_distribution():
    """do_sample=True through model.generate: the two-token continuation distribution is HF's exact one."""
    model = tiny_model("llama", vocab_size=12, seed=3)
    prompt = torch.tensor([[3, 5, 7, 4]])
    cells, probabilities = exact_distribution(model, prompt, 2, hf_processors(temperature=0.9, top_k=6))
    torch.manual_seed(0)
    out = model.generate(
        prompt.expand(3000, -1).contiguous(),
        custom_generate=jacobi_engine.hf.generate,
        block_size=3,
        do_sample=True,
        temperature=0.9,
        top_k=6,
        max_new_tokens=2,
        eos_token_id=[],
        pad_token_id=0,
    )
    p_value, n_bins = goodness_of_fit(out[:, 4:], cells, probabilities)
    assert n_bins > 10 and p_value > 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(output_scores=True, return_dict_in_generate=True), "output_scores=True"),
        (dict(output_logits=True, return_dict_in_generate=True), "output_logits=True"),
        (dict(num_beams=2), "beam search"),
        (dict(max_time=5.0), "MaxTimeCriteria"),
    ],
)
def test_unsupported_settings_are_refused_by_name(kwargs, message):
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, custom_generate=jacobi_engine.hf.generate, max_new_tokens=5, **kwargs)


def test_custom_logits_processor_is_refused():
    from transformers import LogitsProcessor, LogitsProcessorList

    class Boost(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="logits_processor: custom processors \\(Boost\\)"):
        model.generate(
            input_ids,
            custom_generate=jacobi_engine.hf.generate,
            max_new_tokens=5,
            logits_processor=LogitsProcessorList([Boost()]),
        )


def test_shipped_custom_generate_folder():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = ragged_batch(6)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    expected = model.generate(input_ids, do_sample=False, **kwargs)
    path = jacobi_engine.hf.custom_generate_path()
    got = model.generate(input_ids, custom_generate=path, trust_remote_code=True, block_size=4, **kwargs)
    assert torch.equal(got, expected)
