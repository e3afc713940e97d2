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
real token's logits. Checkpoints are written whole or not at all
(:mod:`jacobi_engine.training.checkpoints`). The recipe that builds and runs a trainer from folders
is :func:`jacobi_engine.training.recipe.train_consistency`.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from jacobi_engine.training.checkpoints import publish_checkpoint, staging_dir
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

    # While a checkpoint is being written: the folder transformers writes it into (see _save_checkpoint).
    _staging_dir: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-<step>`` whole or not at all: transformers writes everything (weights,
        optimizer, scheduler, RNG, trainer state; each process its part) into
        ``tmp-checkpoint-<step>/checkpoint-<step>``, which is renamed to ``checkpoint-<step>`` once all
        processes are done; the ``save_total_limit`` rotation then runs on the real folder (the one
        transformers runs inside the staging folder sees only the new checkpoint)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_dir(run_dir, self.state.global_step)
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        if self.state.best_model_checkpoint == str(staging / name):
            self.state.best_model_checkpoint = str(run_dir / name)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

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
