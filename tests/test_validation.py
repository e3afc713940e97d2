"""Bad input gets a clear ValueError/TypeError naming the argument, and the engine keeps working."""

from __future__ import annotations

import pytest
import torch
import transformers
from models import tiny_model

from jacobi_engine import JacobiEngine, generate

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", vocab_size=VOCAB)  # 256 learned positions


@pytest.fixture(scope="module")
def engine(model):
    return JacobiEngine(model, block_size=4)


def ids(*shape, high=VOCAB):
    return torch.randint(3, high, shape, generator=torch.Generator().manual_seed(0))


def works(engine):
    out = engine.generate(ids(2, 5), max_new_tokens=6, eos_token_id=[])
    assert out.sequences.shape == (2, 11)


BAD_GENERATE_CALLS = [
    ("empty", dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "input_ids"),
    ("empty batch", dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), ValueError, "input_ids"),
    ("float ids", dict(input_ids=torch.rand(1, 4)), TypeError, "input_ids"),
    ("bool ids", dict(input_ids=torch.ones(1, 4, dtype=torch.bool)), TypeError, "input_ids"),
    ("list ids", dict(input_ids=[[1, 2, 3]]), TypeError, "input_ids"),
    ("3-D ids", dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long)), ValueError, "input_ids"),
    ("id too large", dict(input_ids=torch.tensor([[3, VOCAB]])), ValueError, "vocabulary"),
    ("negative id", dict(input_ids=torch.tensor([[3, -1]])), ValueError, "vocabulary"),
    ("prompt beyond positions", dict(input_ids=torch.ones(1, 257, dtype=torch.long)), ValueError, "positions"),
    (
        "prompt + new beyond positions",
        dict(input_ids=torch.ones(1, 200, dtype=torch.long), max_new_tokens=57),
        ValueError,
        "max_new_tokens",
    ),
    ("negative max_new_tokens", dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    ("float max_new_tokens", dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    ("mask shape", dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "attention_mask"),
    ("mask values", dict(attention_mask=torch.full((2, 5), 2)), ValueError, "attention_mask"),
    (
        "right padding",
        dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])),
        ValueError,
        "left-padded",
    ),
    ("empty row", dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])), ValueError, "attention_mask"),
    ("mask type", dict(attention_mask=[[1] * 5] * 2), TypeError, "attention_mask"),
    ("meta device", dict(input_ids=torch.ones(2, 5, dtype=torch.long, device="meta")), ValueError, "device|on meta"),
    ("eos type", dict(eos_token_id="2"), TypeError, "eos_token_id"),
    ("eos negative", dict(eos_token_id=[-3]), ValueError, "eos_token_id"),
    ("pad type", dict(pad_token_id=1.0), TypeError, "pad_token_id"),
    ("streamer protocol", dict(streamer=object()), TypeError, "streamer"),
]


@pytest.mark.parametrize("case", BAD_GENERATE_CALLS, ids=[c[0] for c in BAD_GENERATE_CALLS])
def test_bad_generate_arguments(engine, case):
    _, overrides, error, message = case
    kwargs = dict(input_ids=ids(2, 5), max_new_tokens=4)
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        engine.generate(**kwargs)
    works(engine)


def test_streamer_needs_batch_one(engine):
    class Collector:
        def put(self, value):
            pass

        def end(self):
            pass

    with pytest.raises(ValueError, match="streamer"):
        engine.generate(ids(2, 5), max_new_tokens=4, streamer=Collector())
    works(engine)


def test_max_seq_len_limit(model):
    engine = JacobiEngine(model, block_size=4, max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate(ids(1, 10), max_new_tokens=7)
    out = engine.generate(ids(1, 10), max_new_tokens=6, eos_token_id=[])
    assert out.sequences.shape == (1, 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        JacobiEngine(model, max_seq_len=1000)  # beyond the model's 256 positions


BAD_ENGINE_ARGUMENTS = [
    ("block_size 0", dict(block_size=0), ValueError, "block_size"),
    ("block_size negative", dict(block_size=-3), ValueError, "block_size"),
    ("block_size float", dict(block_size=2.0), TypeError, "block_size"),
    ("block_size bool", dict(block_size=True), TypeError, "block_size"),
    ("mode", dict(mode="parallel"), ValueError, "mode"),
    ("init", dict(init="zeros"), ValueError, "init"),
    ("max_seq_len", dict(max_seq_len=0), ValueError, "max_seq_len"),
    ("seed", dict(seed="0"), TypeError, "seed"),
    ("attention backend", dict(attention_backend="cuda"), ValueError, "attention_backend"),
    ("verify backend", dict(verify_backend="cuda"), ValueError, "verify_backend"),
]


@pytest.mark.parametrize("case", BAD_ENGINE_ARGUMENTS, ids=[c[0] for c in BAD_ENGINE_ARGUMENTS])
def test_bad_engine_arguments(model, case):
    _, kwargs, error, message = case
    with pytest.raises(error, match=message):
        JacobiEngine(model, **kwargs)


def test_rejects_models_we_cannot_drive():
    with pytest.raises(TypeError, match="model"):
        JacobiEngine(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="model"):
        generate("gpt2", ids(1, 4))
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        JacobiEngine(t5)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="AttentionInterface"):
        JacobiEngine(bloom)
    encoder = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(ValueError, match="causal LM"):
        JacobiEngine(encoder)


def test_attention_outside_engine_is_a_clear_error():
    from jacobi_engine.attention import ATTN_IMPLEMENTATION

    model = tiny_model("llama", vocab_size=VOCAB)
    model.config._attn_implementation_internal = ATTN_IMPLEMENTATION
    with pytest.raises(RuntimeError, match="JacobiEngine"):
        model(ids(1, 4))
