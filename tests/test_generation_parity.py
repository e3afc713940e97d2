"""generation_config parity: each processor, lengths, attention-mask inference and length-dependent RoPE
against HF's own greedy generate (fp32), in both modes and several block sizes."""

from __future__ import annotations

import pytest
import torch
import transformers
from greedy_check import assert_matches_greedy
from models import tiny_model

from jacobi_engine import JacobiEngine

VOCAB = 96
PAD = 0


def ragged_prompts(batch=3, width=10, seed=3, repeat=False):
    generator = torch.Generator().manual_seed(seed)
    high = 12 if repeat else VOCAB  # a small alphabet makes repetitions (and n-gram bans) frequent
    input_ids = torch.randint(3, high, (batch, width), generator=generator)
    mask = torch.ones_like(input_ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
        input_ids[row, : 2 * row] = PAD
    return input_ids, mask


WIDTH = 10


def _generated(plain, row, index):
    return int(plain[row, WIDTH + index])


# Settings per processor; callables pick their tokens from the unprocessed HF output, so that each
# setting really changes what HF generates in this test (checked below).
PROCESSORS = {
    "repetition_penalty": dict(repetition_penalty=1.7),
    "repetition_penalty_below_1": dict(repetition_penalty=0.6),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "no_repeat_ngram_size_3": dict(no_repeat_ngram_size=3),
    "min_new_tokens": dict(min_new_tokens=12),
    "min_length": dict(min_length=WIDTH + 16),
    "suppress_tokens": lambda plain: dict(suppress_tokens=[_generated(plain, 0, 3), _generated(plain, 1, 5)]),
    "begin_suppress_tokens": lambda plain: dict(begin_suppress_tokens=[_generated(plain, r, 0) for r in range(3)]),
    "bad_words_ids": lambda plain: dict(
        bad_words_ids=[
            [_generated(plain, 0, 4)],
            [_generated(plain, 1, 2), _generated(plain, 1, 3)],
            [_generated(plain, 2, 1), _generated(plain, 2, 2), _generated(plain, 2, 3)],
            [2],
        ]
    ),
    "forced_eos_token_id": dict(forced_eos_token_id=2),
    "renormalize_logits": dict(renormalize_logits=True, repetition_penalty=1.3),
    "combined": dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=6, suppress_tokens=[8]),
}


def _hf(model, input_ids, mask, **kwargs):
    return model.generate(input_ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kwargs)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", vocab_size=VOCAB)


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize("mode", ["sliding", "chunked"])
def test_processor_matches_hf(llama, name, mode):
    input_ids, mask = ragged_prompts(width=WIDTH, repeat=name.startswith("no_repeat"))
    eos = [2, 3]  # frequent EOS ids, so min_length / min_new_tokens / forced EOS matter
    plain = _hf(llama, input_ids, mask, max_new_tokens=24, eos_token_id=eos)
    settings = PROCESSORS[name]
    settings = settings(plain) if callable(settings) else settings
    expected = _hf(llama, input_ids, mask, max_new_tokens=24, eos_token_id=eos, **settings)
    assert not torch.equal(expected, plain), f"{name} has no effect in this test"
    for block_size in (1, 4, 9):
        engine = JacobiEngine(llama, block_size=block_size, mode=mode)
        out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=24, eos_token_id=eos, **settings)
        assert_matches_greedy(llama, out.sequences, expected, input_ids, mask, PAD)


def test_processors_from_the_models_generation_config(llama):
    """Settings in model.generation_config apply without being passed, as in HF."""
    model = tiny_model("qwen2", vocab_size=VOCAB)
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.no_repeat_ngram_size = 2
    model.generation_config.max_new_tokens = 21
    input_ids, mask = ragged_prompts(seed=5, repeat=True)
    expected = model.generate(input_ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, eos_token_id=[])
    assert expected.shape[1] == input_ids.shape[1] + 21
    for mode in ("sliding", "chunked"):
        out = JacobiEngine(model, block_size=6, mode=mode).generate(input_ids, attention_mask=mask, eos_token_id=[])
        assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)


def test_max_new_tokens_follows_generation_config():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = ragged_prompts(batch=1, seed=1)
    for field, value in (("max_new_tokens", 37), ("max_length", 31), (None, None)):
        config = transformers.GenerationConfig(eos_token_id=[], pad_token_id=PAD)
        if field is not None:
            setattr(config, field, value)
        expected = model.generate(input_ids, attention_mask=mask, generation_config=config, do_sample=False)
        out = JacobiEngine(model, block_size=5).generate(input_ids, attention_mask=mask, generation_config=config)
        assert out.sequences.shape == expected.shape, field  # HF's default without either is 20 new tokens
        assert torch.equal(out.sequences, expected), field


def test_unsupported_settings_are_refused_by_name(llama):
    input_ids = torch.randint(3, VOCAB, (1, 6))
    engine = JacobiEngine(llama, block_size=4)
    for settings, name in (
        (dict(num_beams=2), "num_beams"),
        (dict(do_sample=True, typical_p=0.5), "typical_p"),
        (dict(do_sample=True, epsilon_cutoff=0.1), "epsilon_cutoff"),
        (dict(sequence_bias=[[[5], 2.0]]), "sequence_bias"),
        (dict(exponential_decay_length_penalty=(3, 1.5)), "exponential_decay_length_penalty"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(guidance_scale=2.0), "guidance_scale"),
    ):
        with pytest.raises(ValueError, match=name):
            engine.generate(input_ids, max_new_tokens=4, **settings)
    with pytest.raises(TypeError, match="not_a_setting"):
        engine.generate(input_ids, max_new_tokens=4, not_a_setting=3)
    model = tiny_model("llama", vocab_size=VOCAB)
    # Sampling-only warpers do not change greedy output, so they are accepted with do_sample=False.
    out = JacobiEngine(model, block_size=4).generate(input_ids, max_new_tokens=4, do_sample=False, temperature=0.3)
    assert out.sequences.shape == (1, 10)


def test_missing_attention_mask_is_inferred_like_hf():
    """A pad id inside an unmasked call: HF masks it (left padding and a pad in the middle)."""
    model = tiny_model("llama", vocab_size=VOCAB)
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, VOCAB, (3, 11), generator=generator)
    input_ids[1, :4] = PAD  # left padding, no mask given
    input_ids[2, 5] = PAD  # a pad id inside the prompt
    model.generation_config.pad_token_id = PAD
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=15, eos_token_id=[])
    inferred = (input_ids != PAD).long()
    for mode in ("sliding", "chunked"):
        out = JacobiEngine(model, block_size=5, mode=mode).generate(input_ids, max_new_tokens=15, eos_token_id=[])
        assert_matches_greedy(model, out.sequences, expected, input_ids, inferred, PAD)
    # The same ids with an all-ones mask give other tokens: the inference really matters here.
    ones = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=15, eos_token_id=[]
    )
    assert not torch.equal(ones, expected)


def test_right_padding_is_refused():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        JacobiEngine(model).generate(input_ids, attention_mask=mask, max_new_tokens=4)


def _rope_model(kind: str):
    torch.manual_seed(0)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        initializer_range=0.2,
        pad_token_id=PAD,
        eos_token_id=2,
        bos_token_id=1,
    )
    if kind == "dynamic":
        config = transformers.LlamaConfig(
            max_position_embeddings=40, rope_scaling={"rope_type": "dynamic", "factor": 4.0}, **common
        )
        return transformers.LlamaForCausalLM(config).eval(), 40
    config = transformers.Phi3Config(
        max_position_embeddings=160,
        original_max_position_embeddings=40,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8},
        **common,
    )
    return transformers.Phi3ForCausalLM(config).eval(), 40


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_rope_exact_up_to_the_switch_and_refused_past_it(kind):
    model, switch = _rope_model(kind)
    input_ids, mask = ragged_prompts(batch=2, width=12, seed=2)
    longest = int(mask.sum(1).max())
    # HF's last forward sees longest + max_new - 1 positions: this request ends exactly at the switch,
    # so every guess slot past it must be kept from changing the frequencies.
    max_new = switch - longest + 1
    expected = _hf(model, input_ids, mask, max_new_tokens=max_new, eos_token_id=[])
    for mode in ("sliding", "chunked"):
        for block_size in (4, 16):
            out = JacobiEngine(model, block_size=block_size, mode=mode).generate(
                input_ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[]
            )
            assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)
    # One token more would switch frequencies mid-generation in HF: refused, naming the rope type
    # (not "exceeds the model's positions", which HF would serve).
    with pytest.raises(ValueError, match=kind):
        JacobiEngine(model, block_size=4).generate(input_ids, attention_mask=mask, max_new_tokens=max_new + 1)


def test_switch_really_changes_the_output():
    """The guard above is needed: past the switch, HF's dynamic RoPE output differs from plain RoPE's."""
    model, switch = _rope_model("dynamic")
    input_ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(4))
    scaled = _hf(model, input_ids, None, max_new_tokens=40, eos_token_id=[])
    config = model.config.to_dict()
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": model.config.rope_parameters["rope_theta"]}
    config.pop("rope_scaling", None)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    plain.load_state_dict(model.state_dict())
    reference = _hf(plain, input_ids, None, max_new_tokens=40, eos_token_id=[])
    assert torch.equal(scaled[:, : switch + 1], reference[:, : switch + 1])
    assert not torch.equal(scaled, reference)
