"""Consistency (CLLM) training on collected Jacobi trajectories, with the Hugging Face Trainer.

Each training row is one chunk of one prompt (see :mod:`jacobi_engine.training.collect`). Per
step, for every row of the batch, the collator draws one state of the chunk's trajectory:

* ``loss="global"``: a random intermediate state ``y_i`` (student) against the fixed point
  ``y*`` (teacher);
* ``loss="local"``: a random adjacent pair, ``y_j`` (student) against ``y_{j+1}`` (teacher).

A step then runs

1. the teacher: the model on ``[x; teacher block]`` under ``torch.no_grad()``, the
   stop-gradient of the CLLM objective, so no activations are kept for it;
2. one forward with gradients over the student rows ``[x; student block]`` and the AR rows
   (``[x; y*]``, or ``[real prompt; ground-truth answer]`` with ``use_labels``) stacked in
   one batch;
3. ``loss = consistency_loss + ar_weight * CE`` (:mod:`jacobi_engine.training.losses`) and
   one backward, which keeps DDP to one gradient all-reduce per step.

Sequences are right-padded, so positions are plain ``0..len-1`` and padding never changes a
real token's logits.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from jacobi_engine.training.distributed import enable_fsdp_on_cpu
from jacobi_engine.training.losses import IGNORE_INDEX, ar_loss, consistency_loss
from jacobi_engine.training.schedules import NOISE_SCHEDULES, draw_state_index

LOSSES = ("global", "local")
REQUIRED_COLUMNS = ("prompt_index", "chunk_index", "prompt_length", "prompt_ids", "states", "fixed_point", "label_ids")


def _right_pad(sequences: list[list[int]], width: int, value: int) -> torch.Tensor:
    padded = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, ids in enumerate(sequences):
        padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return padded


def pick_states(
    states: list[list[int]], loss: str, rng, schedule: str = "random", progress: float = 0.0
) -> tuple[list[int], list[int]]:
    """(student block, teacher block) for one trajectory; ``states[-1]`` is the fixed point.

    ``global``: an intermediate state and the fixed point. ``local``: a state and the next one.
    Which state: :func:`jacobi_engine.training.schedules.draw_state_index` (``schedule`` random:
    uniform; progressive: the least noisy states at ``progress`` 0, all of them at 1). A
    trajectory with a single state gives (y*, y*): loss 0.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if len(states) < 2:
        return states[-1], states[-1]
    j = draw_state_index(states, rng, schedule, progress)
    if loss == "global":
        return states[j], states[-1]
    return states[j], states[j + 1]


@dataclass
class TrajectoryCollator:
    """Turns trajectory rows into the tensors of one consistency step.

    Returns (B rows, L = longest prompt + longest block, n = longest block, La = longest AR row):

    * ``student_input_ids``, ``teacher_input_ids`` int64 [B, L]: ``x`` then the student /
      teacher block, right-padded; ``attention_mask`` int64 [B, L] (the same for both);
    * ``block_start`` int64 [B]: the column of slot 0 (= ``len(x)``);
    * ``student_block``, ``teacher_block`` int64 [B, n]; ``slot_mask`` bool [B, n] (real slots);
    * ``ar_input_ids``, ``ar_attention_mask``, ``ar_labels`` int64 [B, La]: ``[x; y*]`` (or
      ``[prompt; ground truth]`` with ``use_labels``, or a drawn ``ar_corpus`` pair); labels are
      -100 except on the answer;
    * ``noise_progress`` float scalar: the training progress the noise schedule used.

    Which state a row gets is a pure function of ``(seed, epoch, prompt_index, chunk_index)``
    (the trainer advances ``epoch``), or drawn from ``rng`` when one is given. Not a shared RNG:
    the data loader collates one batch ahead, so the RNG state a checkpoint saves has already
    served the next batch, and a resumed run would draw differently from an uninterrupted one.
    """

    loss: str = "global"
    use_labels: bool = False
    pad_id: int = 0
    seed: int = 0
    epoch: int = 0
    rng: random.Random | None = None
    # (prompt ids, answer ids) pairs: when given, each sample's AR row is one of these, drawn
    # like its state, instead of its own chunk or label (see ``train_consistency(ar_data=...)``).
    ar_corpus: list[tuple[list[int], list[int]]] | None = None
    # Noise schedule (see jacobi_engine.training.schedules). Progressive needs the optimizer step
    # of each batch: the trainer's callback keeps ``batch_counter`` (batches collated, aligned
    # to whole steps at each epoch start) and ``max_steps``/``grad_accum``.
    noise_schedule: str = "random"
    max_steps: int = 0
    grad_accum: int = 1
    batch_counter: int = 0

    def __post_init__(self):
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")

    def _rng(self, row: dict, chunk_index=None):
        if self.rng is not None:
            return self.rng
        chunk_index = row.get("chunk_index") if chunk_index is None else chunk_index
        return random.Random(f"{self.seed}:{self.epoch}:{row.get('prompt_index')}:{chunk_index}")

    def next_progress(self) -> float:
        """Training progress in [0, 1] of the batch being collated (step / (max_steps - 1)); counts it."""
        step = self.batch_counter // max(1, self.grad_accum)
        self.batch_counter += 1
        if self.max_steps <= 1:
            return 1.0 if self.max_steps == 1 else 0.0
        return min(1.0, step / (self.max_steps - 1))

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        students, teachers, contexts, ar_rows, ar_starts = [], [], [], [], []
        progress = self.next_progress()
        for row in rows:
            rng = self._rng(row)
            student, teacher = pick_states(row["states"], self.loss, rng, self.noise_schedule, progress)
            students.append(list(student))
            teachers.append(list(teacher))
            contexts.append(list(row["prompt_ids"]))
            if self.ar_corpus:
                prompt, answer = self.ar_corpus[rng.randrange(len(self.ar_corpus))]
                ar_rows.append(list(prompt) + list(answer))
                ar_starts.append(len(prompt))
            elif self.use_labels:
                if not row["label_ids"]:
                    raise ValueError(
                        f"use_labels is set but prompt {row.get('prompt_index')} has no ground-truth answer"
                    )
                prompt = list(row["prompt_ids"][: row["prompt_length"]])
                ar_rows.append(prompt + list(row["label_ids"]))
                ar_starts.append(len(prompt))
            else:
                ar_rows.append(list(row["prompt_ids"]) + list(row["fixed_point"]))
                ar_starts.append(len(row["prompt_ids"]))

        n = max(len(block) for block in students)
        width = max(len(context) for context in contexts) + n
        block_lengths = torch.tensor([len(block) for block in students])
        block_start = torch.tensor([len(context) for context in contexts])
        columns = torch.arange(width)[None, :]
        attention_mask = (columns < (block_start + block_lengths)[:, None]).to(torch.long)
        ar_width = max(len(ids) for ids in ar_rows)
        ar_lengths = torch.tensor([len(ids) for ids in ar_rows])
        ar_columns = torch.arange(ar_width)[None, :]
        ar_input_ids = _right_pad(ar_rows, ar_width, self.pad_id)
        ar_attention_mask = (ar_columns < ar_lengths[:, None]).to(torch.long)
        answer = (ar_columns >= torch.tensor(ar_starts)[:, None]) & ar_attention_mask.bool()
        return {
            "student_input_ids": _right_pad([c + s for c, s in zip(contexts, students)], width, self.pad_id),
            "teacher_input_ids": _right_pad([c + t for c, t in zip(contexts, teachers)], width, self.pad_id),
            "attention_mask": attention_mask,
            "block_start": block_start,
            "student_block": _right_pad(students, n, self.pad_id),
            "teacher_block": _right_pad(teachers, n, self.pad_id),
            "slot_mask": torch.arange(n)[None, :] < block_lengths[:, None],
            "ar_input_ids": ar_input_ids,
            "ar_attention_mask": ar_attention_mask,
            "ar_labels": torch.where(answer, ar_input_ids, IGNORE_INDEX),
            "noise_progress": torch.tensor(progress),
        }


def block_logits(logits: torch.Tensor, block_start: torch.Tensor, n: int) -> torch.Tensor:
    """``logits`` [B, L, V] of whole rows -> [B, n, V] at columns ``block_start[b] .. + n - 1``."""
    columns = block_start.to(logits.device)[:, None] + torch.arange(n, device=logits.device)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    return logits[rows, columns]


def _pad_columns(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


class _CollatorEpoch(transformers.TrainerCallback):
    """Tells the collator which epoch and which optimizer step it is collating, so each epoch
    draws new states and the noise schedule follows the step, identically after a resume.

    The data loader collates ahead of the step that uses a batch, so the step is not read from
    the trainer's state at collation time; it is counted: ``global_step * grad_accum`` batches at
    train begin (a resume skips the trained batches without collating them), one per collated
    batch, rounded up to a whole step at each epoch start (the trainer ends an epoch with a
    partial step when its batches do not divide by ``grad_accum``)."""

    def __init__(self, collator: TrajectoryCollator):
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        self.collator.max_steps = state.max_steps
        self.collator.grad_accum = args.gradient_accumulation_steps
        self.collator.batch_counter = state.global_step * args.gradient_accumulation_steps

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = math.floor((state.epoch or 0.0) + 1e-6)
        accum = max(1, args.gradient_accumulation_steps)
        self.collator.batch_counter = -(-self.collator.batch_counter // accum) * accum


class ConsistencyTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss is CLLM's consistency loss plus a weighted AR loss.

    ``loss``: ``"global"`` or ``"local"``; it decides which states the collator pairs, so without
    a ``data_collator`` one is made (:class:`TrajectoryCollator`), and a given one must agree.
    ``ar_weight``: w of the AR term (CLLM uses 10); ``label_smoothing`` of the AR cross-entropy.
    Pass ``remove_unused_columns=False`` in the training arguments (the collator needs every column).
    """

    def __init__(self, *args, loss: str = "global", ar_weight: float = 10.0, label_smoothing: float = 0.0, **kwargs):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        collator = kwargs.get("data_collator")
        if collator is None:
            training_args = kwargs.get("args") or (args[1] if len(args) > 1 else None)
            kwargs["data_collator"] = TrajectoryCollator(loss=loss, seed=getattr(training_args, "seed", 0))
        elif isinstance(collator, TrajectoryCollator) and collator.loss != loss:
            raise ValueError(
                f"the trainer's loss is {loss!r} but its TrajectoryCollator pairs states for {collator.loss!r}"
            )
        super().__init__(*args, **kwargs)
        self.ar_weight = ar_weight
        self.ar_label_smoothing = label_smoothing
        # Our loss is a per-batch mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        if isinstance(self.data_collator, TrajectoryCollator):
            self.add_callback(_CollatorEpoch(self.data_collator))
        self._loss_sums = {"consistency_loss": 0.0, "ar_loss": 0.0}
        self._loss_count = 0

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)  # accelerate drops FSDP on CPU; see training/distributed.py

    def teacher_logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher block logits [B, n, V], computed without gradients (stop-gradient)."""
        n = inputs["teacher_block"].shape[1]
        with torch.no_grad():
            output = model(
                input_ids=inputs["teacher_input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            )
            return block_logits(output.logits, inputs["block_start"], n).detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch, n = inputs["student_block"].shape
        teacher = self.teacher_logits(model, inputs)
        width = max(inputs["student_input_ids"].shape[1], inputs["ar_input_ids"].shape[1])
        input_ids = torch.cat(
            [_pad_columns(inputs["student_input_ids"], width, 0), _pad_columns(inputs["ar_input_ids"], width, 0)]
        )
        attention_mask = torch.cat(
            [_pad_columns(inputs["attention_mask"], width, 0), _pad_columns(inputs["ar_attention_mask"], width, 0)]
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        student = block_logits(logits[:batch], inputs["block_start"], n)
        consistency = consistency_loss(
            student, teacher, inputs["student_block"], inputs["teacher_block"], inputs["slot_mask"]
        )
        ar_width = inputs["ar_input_ids"].shape[1]
        autoregressive = ar_loss(
            logits[batch:, :ar_width], inputs["ar_labels"], self.ar_weight, self.ar_label_smoothing
        )
        loss = consistency + autoregressive
        self._loss_sums["consistency_loss"] += float(consistency.detach())
        self._loss_sums["ar_loss"] += float(autoregressive.detach())
        self._loss_count += 1
        return (loss, {"logits": logits}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._loss_count and "loss" in logs:
            for name, total in self._loss_sums.items():
                logs[name] = round(total / self._loss_count, 4)
                self._loss_sums[name] = 0.0
            self._loss_count = 0
        super().log(logs, *args, **kwargs)


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

    Checkpoints go to ``out_dir/checkpoint-<step>`` every ``save_steps``; with ``resume`` the
    latest one is continued (model, optimizer, scheduler, RNG and data order). The final model
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
    from transformers.trainer_utils import get_last_checkpoint

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
        from jacobi_engine.training.packing import (
            PackedCollator,
            PackedConsistencyTrainer,
            PackedTrajectories,
            group_by_prompt,
        )

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
    checkpoint = get_last_checkpoint(str(out_dir)) if resume and out_dir.is_dir() else None
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
