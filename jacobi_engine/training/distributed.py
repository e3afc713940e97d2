"""Helpers for running collection and training under ``torchrun`` / ``accelerate launch``."""

from __future__ import annotations

import os
from datetime import timedelta


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_launcher(timeout_hours: float = 24.0) -> bool:
    """Join the process group a launcher (torchrun, accelerate launch) describes in the environment.

    Returns True when this process is one of several. The group is gloo even on GPUs: collection
    only needs barriers, and a slow rank must not trip NCCL's 10-minute watchdog, hence the long
    timeout (one rank may finish its prompts hours before another).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
    return True


def enable_fsdp_on_cpu(trainer) -> None:
    """Turn on accelerate's FSDP for a multi-process CPU (gloo) run.

    accelerate enables FSDP only on accelerator devices: on CPU it silently drops the plugin the
    Trainer built from ``TrainingArguments(fsdp=...)`` (or ``accelerate launch --use_fsdp`` put in
    the environment) and falls back to DDP. FSDP2 itself (``fully_shard``, DTensor, distributed
    checkpoints) works on CPU with gloo, so we switch accelerate's shared state to FSDP, as its own
    GPU code path does. On GPUs accelerate has already done it and this is a no-op.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin_args = trainer.args.fsdp_plugin_args
    if plugin_args is not None:
        plugin = FullyShardedDataParallelPlugin(**plugin_args)
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        plugin = FullyShardedDataParallelPlugin()  # reads accelerate launch's FSDP_* variables
    else:
        return
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # accelerate keeps the type in two shared states; a reader of the other one would see DDP.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
