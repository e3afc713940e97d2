"""Tiny randomly initialised Hugging Face models, built offline from configs."""

from __future__ import annotations

import torch
import transformers

# Logits of a default-initialised tiny model are nearly flat, which makes argmax near-ties
# common; a larger init spreads them out.
INIT_RANGE = 0.2


def _common(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=0)


ARCHITECTURES = {
    "llama": lambda v: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **_common(v),
        )
    ),
    "qwen2": lambda v: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **_common(v),
        )
    ),
    "gpt2": lambda v: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **_common(v))
    ),
    "mistral_sliding": lambda v: transformers.MistralForCausalLM(
        transformers.MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
            sliding_window=12,
            **_common(v),
        )
    ),
    "gemma2": lambda v: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=10,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0,
            **_common(v),
        )
    ),
    "opt": lambda v: transformers.OPTForCausalLM(
        transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            **_common(v),
        )
    ),
    "gpt_neox": lambda v: transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            rotary_pct=0.5,
            **_common(v),
        )
    ),
}


def tiny_model(arch: str = "llama", vocab_size: int = 96, seed: int = 0, dtype=torch.float32):
    """A tiny random model of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch](vocab_size).to(dtype).eval()
    return model
