"""Models placed by accelerate's ``device_map``: a split across devices is refused at
``JacobiEngine(model)`` with a clear error; offloading to CPU or disk runs, equal to HF greedy."""

from __future__ import annotations

import pytest
import torch
import transformers
from greedy_check import assert_matches_greedy, hf_greedy
from models import tiny_model

from jacobi_engine import JacobiEngine
from jacobi_engine.hf_compat import check_single_device

PIPELINE_SPLITS = [
    {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1},
    {"model.embed_tokens": "cuda:0", "model.layers": "cuda:1", "model.norm": "cuda:1", "lm_head": "cuda:1"},
    {"": 0, "model.layers.1": torch.device("cuda", 1), "lm_head": "disk"},
    {"model.embed_tokens": 0, "model.layers": "mps", "lm_head": "cpu"},
]


@pytest.mark.parametrize("device_map", PIPELINE_SPLITS)
def test_split_across_devices_is_refused(device_map):
    # Built on CPU: accelerate records the placement in ``hf_device_map``, which is what we read.
    model = tiny_model("llama")
    model.hf_device_map = device_map
    with pytest.raises(ValueError, match="split across devices .*tp_plan"):
        JacobiEngine(model)


@pytest.mark.parametrize(
    "device_map",
    [
        {"": 0},
        {"": "cpu"},
        {"model": 0, "lm_head": "cuda:0"},
        {"model": 0, "lm_head": "cpu"},
        {"a": "cpu", "b": "disk"},
    ],
)
def test_one_execution_device_is_accepted(device_map):
    model = tiny_model("llama")
    model.hf_device_map = device_map
    check_single_device(model)  # no error: one compute device, the rest offloaded


def test_cpu_and_disk_offload_decodes_like_hf_greedy(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"}
    device_map |= {"model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "model"), device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    reference = tiny_model("llama")  # the same weights, in memory, for HF greedy
    input_ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0
    expected = hf_greedy(reference, input_ids, mask, 16, eos_token_id=[], pad_token_id=0)
    out = JacobiEngine(model, block_size=4).generate(input_ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    assert assert_matches_greedy(reference, out.sequences, expected, input_ids, mask, pad_token_id=0) == 0
