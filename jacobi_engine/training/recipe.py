"""The consistency-training recipe: folders in, a trained CLLM out (``jacobi-engine train``).

:func:`train_consistency` loads the model and the trajectory dataset, builds a
:class:`~jacobi_engine.training.packing.PackedConsistencyTrainer` (or, unpacked, a
:class:`~jacobi_engine.training.trainer.ConsistencyTrainer`), trains, and saves a
``from_pretrained``-loadable model. Imports run one way: recipe -> packing -> trainer -> losses.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import transformers

from jacobi_engine.training.checkpoints import (
    check_out_dir,
    last_checkpoint,
    remove_partial_checkpoints,
    remove_previous_run,
)
from jacobi_engine.training.packing import PackedCollator, PackedConsistencyTrainer, PackedTrajectories, group_by_prompt
from jacobi_engine.training.schedules import NOISE_SCHEDULES
from jacobi_engine.training.trainer import LOSSES, REQUIRED_COLUMNS, ConsistencyTrainer, TrajectoryCollator

# The default learning rate, log-linear in the parameter count between two anchors: 1e-2 at 1e5
# parameters (measured: python/examples/tune_defaults.py, fresh toy models through the CLI) and
# 2e-5 at 7e9 (the CLLM paper's 7B runs). In between it gives 1.7e-3 at 2.4M parameters, near
# the 1e-3 of the shipped GSM8K CLLM; nothing between 3M and 7B parameters was measured here.
LR_ANCHORS = ((1e5, 1e-2), (7e9, 2e-5))


def default_learning_rate(num_parameters: int) -> float:
    """Learning rate for a model of ``num_parameters`` parameters when none is given (see LR_ANCHORS)."""
    if num_parameters < 1:
        raise ValueError(f"num_parameters must be positive, got {num_parameters}")
    (small, small_lr), (large, large_lr) = LR_ANCHORS
    fraction = (math.log(num_parameters) - math.log(small)) / (math.log(large) - math.log(small))
    fraction = min(1.0, max(0.0, fraction))
    return math.exp(math.log(small_lr) + fraction * (math.log(large_lr) - math.log(small_lr)))


def _load_dataset(data_dir: str | Path, use_labels: bool):
    from datasets import load_from_disk

    dataset = load_from_disk(str(data_dir))
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{data_dir} is not a trajectory dataset (missing columns: {', '.join(missing)})")
    if len(dataset) == 0:
        raise ValueError(f"{data_dir} holds no samples")
    if use_labels and any(len(labels) == 0 for labels in dataset["label_ids"]):
        raise ValueError(f"use_labels is set but some prompts in {data_dir} have no ground-truth answer")
    return dataset


def load_ar_corpus(path: str | Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + EOS) pairs from a JSONL file of ``{"prompt", "answer"}`` lines,
    tokenized like the trajectories (prompt with special tokens, answer without)."""
    from jacobi_engine.training.collect import read_prompts

    if tokenizer is None:
        raise ValueError("ar_data needs the model directory's tokenizer")
    eos = tokenizer.eos_token_id
    corpus = []
    for number, record in enumerate(read_prompts(path), start=1):
        if record["answer"] is None:
            raise ValueError(f"{path}:{number}: ar_data lines need an 'answer' (or 'label')")
        prompt = list(tokenizer(record["prompt"])["input_ids"])
        answer = list(tokenizer(record["answer"], add_special_tokens=False)["input_ids"])
        corpus.append((prompt, answer + ([eos] if eos is not None else [])))
    if not corpus:
        raise ValueError(f"{path} holds no examples")
    return corpus


def _apply_lora(model, r: int, alpha: int, dropout: float, init: str | Path | None = None):
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError as error:
        raise ImportError("--lora needs peft: pip install 'jacobi-engine[lora]'") from error
    if init is not None:  # continue an adapter trained before (its own r and alpha)
        return PeftModel.from_pretrained(model, str(init), is_trainable=True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_consistency(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    loss: str = "global",
    ar_weight: float = 10.0,
    label_smoothing: float = 0.0,
    use_labels: bool = False,
    ar_data: str | Path | None = None,
    max_steps: int = 1000,
    learning_rate: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr_scheduler: str = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    save_steps: int = 500,
    save_total_limit: int | None = 2,
    logging_steps: int = 10,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    lora: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_init: str | Path | None = None,
    bf16: bool = False,
    fsdp: bool = False,
    callbacks: list | None = None,
    packing: bool = True,
    attention: str = "sdpa",
    noise_schedule: str = "random",
) -> ConsistencyTrainer:
    """Fine-tune the model in ``model_dir`` into a CLLM on the trajectories in ``data_dir``.

    Checkpoints go to ``out_dir/checkpoint-<step>`` every ``save_steps``, each written whole or
    not at all (:mod:`jacobi_engine.training.checkpoints`); with ``resume`` the latest one is
    continued (model, optimizer, scheduler, RNG and data order). A non-empty ``out_dir`` is refused
    unless ``resume`` or ``overwrite`` is given; ``overwrite`` deletes the checkpoints of the run saved
    there before training (its final model is replaced at the end). ``out_dir`` may be neither the
    model folder nor inside it nor hold it. The final model
    (LoRA merged into the weights) and the tokenizer are saved to ``out_dir`` with
    ``save_pretrained``. Works unchanged under ``torchrun`` / ``accelerate launch`` (DDP; gloo
    on CPU); ``fsdp`` shards parameters, gradients and optimizer state across the processes
    instead (FSDP2 ``fully_shard`` per decoder layer through accelerate, also on CPU), and
    ``accelerate launch --use_fsdp`` does the same. Returns the trainer.

    The AR term trains on each sample's own chunk fixed point by default, on its ground-truth
    answer with ``use_labels``, or, with ``ar_data`` (a JSONL of ``{"prompt", "answer"}``, e.g.
    the model's original fine-tuning data), on examples drawn from that corpus: with few
    collected prompts, the first two repeat each answer once per chunk and the AR term then
    memorises them, while a large corpus keeps the model's general quality.

    ``learning_rate``: None picks :func:`default_learning_rate` of the model's parameter count.
    ``packing`` (default): one row per prompt holding all its chunks, with the noise-aware mask of
    :mod:`jacobi_engine.training.packing` (same losses, several times fewer tokens); then
    ``batch_size`` counts prompts, so a step trains on all chunks of ``batch_size`` prompts.
    ``attention``: ``"sdpa"`` or ``"flex"`` for the packed mask (FlexAttention cannot train on CPU).
    ``noise_schedule``: ``"random"`` or ``"progressive"`` (:mod:`jacobi_engine.training.schedules`).
    ``lora_init``: with ``lora``, a saved adapter folder to continue training (its own rank and alpha)
    instead of a fresh adapter. With ``lora`` the adapter alone is saved too, in ``out_dir/adapter``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if use_labels and ar_data is not None:
        raise ValueError("use_labels and ar_data both choose the AR data: give one of them")
    if noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")
    if attention not in ("sdpa", "flex"):
        raise ValueError(f"attention must be 'sdpa' or 'flex', got {attention!r}")
    if attention == "flex" and not packing:
        raise ValueError("attention='flex' is the packed mask's; it needs packing=True")
    fsdp_arguments = _fsdp_arguments(fsdp)
    if lora_init is not None and not lora:
        raise ValueError("lora_init continues a LoRA adapter: it needs lora=True")
    if fsdp and lora:
        raise ValueError("fsdp and lora cannot be combined: the merged model is built from unsharded adapters")
    check_out_dir(out_dir, model_dir, resume=resume, overwrite=overwrite, lora_init=lora_init)
    out_dir = Path(out_dir)
    dataset = _load_dataset(data_dir, use_labels)
    # float32 master weights; ``bf16`` turns on autocast (mixed precision), not bf16 weights.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        tokenizer = None
    pad_id = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    if learning_rate is None:
        learning_rate = default_learning_rate(sum(parameter.numel() for parameter in model.parameters()))
    if lora:
        model = _apply_lora(model, lora_r, lora_alpha, lora_dropout, lora_init)
    use_cpu = not torch.cuda.is_available()
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        logging_steps=logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to=[],
        **fsdp_arguments,
    )
    collator_options = dict(
        loss=loss,
        use_labels=use_labels,
        pad_id=pad_id,
        seed=seed,
        ar_corpus=load_ar_corpus(ar_data, tokenizer) if ar_data is not None else None,
        noise_schedule=noise_schedule,
    )
    trainer_options = dict(
        model=model,
        args=args,
        processing_class=tokenizer,
        callbacks=callbacks,
        loss=loss,
        ar_weight=ar_weight,
        label_smoothing=label_smoothing,
    )
    if packing:
        trainer = PackedConsistencyTrainer(
            train_dataset=PackedTrajectories(group_by_prompt(dataset)),
            # FlexAttention compiles per shape: round lengths up to its 128-token blocks.
            data_collator=PackedCollator(**collator_options, pad_to_multiple=128 if attention == "flex" else 1),
            attention=attention,
            **trainer_options,
        )
    else:
        trainer = ConsistencyTrainer(
            train_dataset=dataset, data_collator=TrajectoryCollator(**collator_options), **trainer_options
        )
    if trainer.args.should_save:  # one process per folder deletes, before any process reads it
        if overwrite:
            remove_previous_run(out_dir)
        else:
            remove_partial_checkpoints(out_dir)
    trainer.accelerator.wait_for_everyone()
    checkpoint = last_checkpoint(out_dir) if resume else None
    trainer.train(resume_from_checkpoint=checkpoint)
    save_final_model(trainer, out_dir)
    return trainer


def _fsdp_arguments(fsdp: bool) -> dict:
    if not isinstance(fsdp, bool):
        raise TypeError(f"fsdp must be a bool, got {type(fsdp).__name__}")
    if not fsdp:
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}}


def save_final_model(trainer: ConsistencyTrainer, out_dir: str | Path) -> None:
    """Save a plain ``from_pretrained``-loadable model (LoRA merged) and the tokenizer to ``out_dir``."""
    trainer.accelerator.wait_for_everyone()
    state_dict = None
    if trainer.is_fsdp_enabled:
        # Under FSDP each rank holds a shard of every parameter: gathering the full weights is a
        # collective every rank must join, and only rank 0 receives them.
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # peft: the adapter alone in adapter/, merged weights at the top
        model.save_pretrained(str(Path(out_dir) / "adapter"))
        model = model.merge_and_unload()
    model.save_pretrained(str(out_dir), state_dict=state_dict)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(out_dir))
