"""models.merge_lora (the named CLLM's merge, with no peft at run time) against peft's own merge_and_unload."""

import json

import pytest
import torch

from jacobi_engine import models

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny(seed=0, hidden_size=32, heads=4):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size // 2,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("rank_pattern", [{}, {"o_proj": 2}])
def test_merge_matches_peft(tmp_path, rslora, rank_pattern):
    base = _tiny()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
        use_rslora=rslora,
        rank_pattern=rank_pattern,
    )
    lora = peft.get_peft_model(_tiny(), config)
    lora.save_pretrained(str(tmp_path))
    expected = lora.merge_and_unload().state_dict()
    merged = models.merge_lora(base, tmp_path).state_dict()
    changed = 0
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(value, _tiny().state_dict()[name])
    assert changed == 2 * 4  # every targeted linear of both layers moved


def test_refuses_adapters_it_cannot_merge(tmp_path):
    lora = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        models.merge_lora(_tiny(), tmp_path)
    config_path.write_text(json.dumps(config))
    small = _tiny(hidden_size=16, heads=2)
    with pytest.raises(ValueError, match="LoRA delta"):
        models.merge_lora(small, tmp_path)


def test_scale_weakens_the_adapter_as_a_smaller_alpha_would(tmp_path):
    def adapter(alpha, folder):
        torch.manual_seed(1)  # the same LoRA weights for both alphas
        config = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        lora = peft.get_peft_model(_tiny(), config)
        lora.save_pretrained(str(folder))
        return lora

    adapter(12, tmp_path / "full")
    half = adapter(6, tmp_path / "half").merge_and_unload().state_dict()
    merged = models.merge_lora(_tiny(), tmp_path / "full", scale=0.5).state_dict()
    for name, value in half.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
