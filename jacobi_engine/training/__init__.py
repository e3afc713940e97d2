"""Consistency (CLLM) training: collect Jacobi trajectories, then fine-tune on them.

    from jacobi_engine.training import collect_trajectories, train_consistency

    collect_trajectories(model, tokenizer, prompts, "data/", block_size=16, max_new_tokens=256)
    train_consistency("model/", "data/", "cllm/", loss="global", ar_weight=10.0, max_steps=1000)

Needs the ``train`` extras (``datasets``, ``accelerate``); LoRA needs ``peft``.
"""

from __future__ import annotations

from jacobi_engine.training.collect import augment_states, collect_trajectories, read_prompts
from jacobi_engine.training.losses import (
    ar_loss,
    consistency_loss,
    consistency_mask,
    global_consistency_loss,
    local_consistency_loss,
    masked_kl,
)
from jacobi_engine.training.packing import PackedCollator, PackedConsistencyTrainer, group_by_prompt, packed_losses
from jacobi_engine.training.recipe import train_consistency
from jacobi_engine.training.rounds import run_rounds
from jacobi_engine.training.shards import assemble_dataset
from jacobi_engine.training.trainer import ConsistencyTrainer, TrajectoryCollator

__all__ = [
    "ConsistencyTrainer",
    "PackedCollator",
    "PackedConsistencyTrainer",
    "TrajectoryCollator",
    "ar_loss",
    "assemble_dataset",
    "augment_states",
    "collect_trajectories",
    "consistency_loss",
    "consistency_mask",
    "global_consistency_loss",
    "group_by_prompt",
    "local_consistency_loss",
    "masked_kl",
    "packed_losses",
    "read_prompts",
    "run_rounds",
    "train_consistency",
]
