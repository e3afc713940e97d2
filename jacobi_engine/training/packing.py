"""Packed consistency training: every chunk of a prompt in one sequence, with a noise-aware mask.

The unpacked trainer spends one student forward, one teacher forward and one AR row per
(prompt, chunk) sample, each re-reading the prompt and all chunks before it. Packed, one row
holds one prompt and all K chunks of its output (the trajectory dataset's rows of that prompt):

    tokens     [ prompt | y*_0 | y*_1 | ... | y*_{K-1} | s_0[f_0:] | s_1[f_1:] | ... ]
    positions  [ 0..P-1 | P..  | ...                    | same as the y*_k slots they replace ]

``y*_k`` is chunk k's fixed point (clean) and ``s_k`` a state drawn from its trajectory
(noisy), at the positions ``y*_k`` has, which are the positions the unpacked sample gives it.
``f_k`` is the first slot where ``s_k`` differs from ``y*_k``: the slots before it are the
clean chunk's tokens with the clean chunk's context, so their logits are read from the clean
chunk and the noisy block is only the rest (about half the noisy tokens on our GSM8K data).
The mask (:func:`~jacobi_engine.training.packed_attention.packed_mask_mod`):

* prompt and clean tokens attend causally to prompt and clean tokens: this part is exactly
  ``[x; y*]`` for every chunk at once, so it yields the global loss's teacher logits (detached)
  and the default AR term (labels on every chunk token);
* a noisy block ``s_k[f_k:]`` attends to the prompt, to the clean chunks before it (``x`` of
  the unpacked sample: the prompt + the converged chunks), to ``y*_k[:f_k]`` (= ``s_k[:f_k]``)
  and causally to itself: its logits are those of the unpacked student ``[x; s_k]``;
* nothing attends to a noisy block from outside it, and padding attends only to itself.

So the logits, losses and gradients equal the unpacked trainer's on the same samples (the
gradient also flows through ``x`` in both: the unpacked student row recomputes ``x`` with
gradients). The local loss's teacher (the next state) is packed the same way, in a second
forward without gradients. An ``ar_data``/``use_labels`` AR row is one row per prompt, in a
plain forward of its own (the unpacked trainer draws one per chunk sample).

The mask and the attention function that applies it are :mod:`jacobi_engine.training.packed_attention`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from jacobi_engine.training.losses import IGNORE_INDEX, ar_loss, consistency_loss
from jacobi_engine.training.packed_attention import ATTENTIONS, LAYOUT_KEYS, PAD_CHUNK, PROMPT_CHUNK, packed_logits
from jacobi_engine.training.trainer import ConsistencyTrainer, TrajectoryCollator, pick_states


# -- data -----------------------------------------------------------------------------------------
def group_by_prompt(rows) -> list[dict]:
    """Trajectory-dataset rows (one per prompt and chunk) -> one record per prompt, in
    ``prompt_index`` order: ``prompt_index``, ``prompt_ids`` (the context of the prompt's first
    chunk: the real prompt), ``chunk_indices``, ``fixed_points``, ``states`` (one trajectory per
    chunk) and ``label_ids``.

    Chunks dropped at collection (``max_repeat``) are always a prompt's last ones; a prompt whose
    chunks do not tile its output (chunk k's context is not the prompt plus the chunks before it)
    is refused, since packing would then give a chunk the wrong context.
    """
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(int(row["prompt_index"]), []).append(row)
    records = []
    for prompt_index in sorted(by_prompt):
        chunks = sorted(by_prompt[prompt_index], key=lambda row: row["chunk_index"])
        prompt = list(chunks[0]["prompt_ids"])
        context = list(prompt)
        for chunk in chunks:
            if list(chunk["prompt_ids"]) != context:
                raise ValueError(
                    f"prompt {prompt_index}: chunk {chunk['chunk_index']}'s context is not the prompt plus the "
                    "chunks before it, so its chunks cannot be packed"
                )
            context += list(chunk["fixed_point"])
        records.append(
            {
                "prompt_index": prompt_index,
                "prompt_ids": prompt,
                "prompt_length": int(chunks[0]["prompt_length"]),
                "chunk_indices": [int(chunk["chunk_index"]) for chunk in chunks],
                "fixed_points": [list(chunk["fixed_point"]) for chunk in chunks],
                "states": [[list(state) for state in chunk["states"]] for chunk in chunks],
                "label_ids": list(chunks[0]["label_ids"]),
            }
        )
    return records


class PackedTrajectories(torch.utils.data.Dataset):
    """The records of :func:`group_by_prompt` as a map-style dataset (one item per prompt)."""

    def __init__(self, records: list[dict]):
        if not records:
            raise ValueError("no prompts to pack")
        self.records = records
        self.num_samples = sum(len(record["fixed_points"]) for record in records)
        # Packed row length before trimming the noisy blocks: what the length-grouped sampler sorts by.
        self.lengths = [len(record["prompt_ids"]) + 2 * sum(map(len, record["fixed_points"])) for record in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]


def _pad_rows(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    for index, ids in enumerate(rows):
        padded[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return padded


@dataclass
class PackedCollator(TrajectoryCollator):
    """Packs each prompt record (:class:`PackedTrajectories`) into one row; see the module docstring.

    The state of chunk k of prompt p is drawn exactly as :class:`TrajectoryCollator` draws it for
    the unpacked sample (p, k), same key, same schedule, so both train on the same samples. A
    noisy block starts at the first slot where the student (or, local, the teacher) state
    differs from the fixed point: the slots before it equal the clean chunk's, whose logits
    are the same and not covered by the loss, so they are read from the clean chunk instead.

    Returns (B prompts, L = longest row rounded up to ``pad_to_multiple``, N = chunks, n = longest chunk):

    * ``input_ids``, ``position_ids``, ``chunk_id``, ``context_length`` int64 [B, L]; ``noisy``
      bool [B, L] (see :func:`packed_mask_mod`);
    * ``ar_labels`` int64 [B, L]: the clean chunk tokens (the default AR term), else -100;
    * ``student_index``, ``teacher_index`` int64 [N, n]: flat indices into [B * L] of each
      sample's student block and teacher block (its clean chunk for ``global``; for ``local``
      the same indices, read from the forward over ``teacher_input_ids``);
    * ``student_block``, ``teacher_block`` int64 [N, n]; ``slot_mask`` bool [N, n];
    * ``teacher_input_ids`` int64 [B, L], ``local`` only: the packed rows with the next states;
    * with ``ar_corpus`` or ``use_labels``, one AR row per prompt instead of the chunk labels:
      ``ar_input_ids``, ``ar_attention_mask``, ``ar_labels`` int64 [B, La] (a separate plain
      forward, so that its rows are not padded to the packed rows' length);
    * ``noise_progress`` float scalar: the training progress the noise schedule used.
    """

    pad_to_multiple: int = 1

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        progress = self.next_progress()
        columns = {key: [] for key in ("input_ids", "teacher_input_ids", *LAYOUT_KEYS, "ar_labels")}
        student_columns, teacher_columns, student_blocks, teacher_blocks = [], [], [], []
        ar_rows, ar_starts = [], []
        for record in records:
            prompt = record["prompt_ids"]
            prompt_length = len(prompt)
            output_length = sum(len(fixed_point) for fixed_point in record["fixed_points"])
            clean, clean_chunk_ids = [], []
            noisy_ids, teacher_noisy_ids, noisy_positions, noisy_chunk_ids, noisy_context = [], [], [], [], []
            for chunk, (chunk_index, fixed_point, states) in enumerate(
                zip(record["chunk_indices"], record["fixed_points"], record["states"])
            ):
                student, teacher = pick_states(
                    states, self.loss, self._rng(record, chunk_index), self.noise_schedule, progress
                )
                size, start = len(fixed_point), prompt_length + len(clean)
                first = next(
                    (
                        slot
                        for slot in range(size)
                        if student[slot] != fixed_point[slot] or teacher[slot] != fixed_point[slot]
                    ),
                    size,
                )
                clean_slots = [start + slot for slot in range(size)]
                noisy_slots = [prompt_length + output_length + len(noisy_ids) + slot - first for slot in range(size)]
                student_columns.append([(clean_slots if slot < first else noisy_slots)[slot] for slot in range(size)])
                if self.loss == "local":
                    teacher_columns.append(student_columns[-1])
                else:
                    teacher_columns.append(clean_slots)
                clean += fixed_point
                clean_chunk_ids += [chunk] * size
                noisy_ids += student[first:]
                teacher_noisy_ids += teacher[first:]
                noisy_positions += list(range(start + first, start + size))
                noisy_chunk_ids += [chunk] * (size - first)
                noisy_context += [start + first] * (size - first)
                student_blocks.append(list(student))
                teacher_blocks.append(list(teacher))
            base = prompt + clean
            columns["input_ids"].append(base + noisy_ids)
            columns["teacher_input_ids"].append(base + teacher_noisy_ids)
            columns["position_ids"].append(list(range(len(base))) + noisy_positions)
            columns["chunk_id"].append([PROMPT_CHUNK] * prompt_length + clean_chunk_ids + noisy_chunk_ids)
            columns["noisy"].append([0] * len(base) + [1] * len(noisy_ids))
            columns["context_length"].append([0] * len(base) + noisy_context)
            chunk_labels = clean if self._ar_on_chunks else [IGNORE_INDEX] * output_length
            columns["ar_labels"].append([IGNORE_INDEX] * prompt_length + chunk_labels + [IGNORE_INDEX] * len(noisy_ids))
            if self.ar_corpus:
                ar_rng = random.Random(f"{self.seed}:{self.epoch}:{record['prompt_index']}:ar")
                ar_prompt, ar_answer = self.ar_corpus[ar_rng.randrange(len(self.ar_corpus))]
                ar_rows.append(list(ar_prompt) + list(ar_answer))
                ar_starts.append(len(ar_prompt))
            elif self.use_labels:
                if not record["label_ids"]:
                    raise ValueError(
                        f"use_labels is set but prompt {record['prompt_index']} has no ground-truth answer"
                    )
                real_prompt = prompt[: record["prompt_length"]]
                ar_rows.append(real_prompt + record["label_ids"])
                ar_starts.append(len(real_prompt))

        width = max(len(ids) for ids in columns["input_ids"])
        width = -(-width // self.pad_to_multiple) * self.pad_to_multiple
        pad_values = {"input_ids": self.pad_id, "teacher_input_ids": self.pad_id, "chunk_id": PAD_CHUNK}
        pad_values["ar_labels"] = IGNORE_INDEX
        batch = {key: _pad_rows(values, width, pad_values.get(key, 0)) for key, values in columns.items()}
        batch["noisy"] = batch["noisy"].bool()
        if self.loss != "local":
            del batch["teacher_input_ids"]
        n = max(len(block) for block in student_blocks)
        student_index = torch.zeros((len(student_blocks), n), dtype=torch.long)
        teacher_index = torch.zeros_like(student_index)
        sample = 0
        for row, record in enumerate(records):
            for _ in record["fixed_points"]:
                size = len(student_columns[sample])
                student_index[sample, :size] = row * width + torch.tensor(student_columns[sample])
                teacher_index[sample, :size] = row * width + torch.tensor(teacher_columns[sample])
                sample += 1
        block_lengths = torch.tensor([len(block) for block in student_blocks])
        batch.update(
            student_index=student_index,
            teacher_index=teacher_index,
            student_block=_pad_rows(student_blocks, n, self.pad_id),
            teacher_block=_pad_rows(teacher_blocks, n, self.pad_id),
            slot_mask=torch.arange(n)[None, :] < block_lengths[:, None],
            noise_progress=torch.tensor(progress),
        )
        if ar_rows:
            ar_width = max(len(ids) for ids in ar_rows)
            ar_input_ids = _pad_rows(ar_rows, ar_width, self.pad_id)
            ar_columns = torch.arange(ar_width)[None, :]
            ar_attention_mask = ar_columns < torch.tensor([len(ids) for ids in ar_rows])[:, None]
            answer = (ar_columns >= torch.tensor(ar_starts)[:, None]) & ar_attention_mask
            batch.update(
                ar_input_ids=ar_input_ids,
                ar_attention_mask=ar_attention_mask.long(),
                ar_labels=torch.where(answer, ar_input_ids, IGNORE_INDEX),
            )
        return batch

    @property
    def _ar_on_chunks(self) -> bool:
        return not self.ar_corpus and not self.use_labels


def packed_losses(
    model,
    batch: dict[str, torch.Tensor],
    ar_weight: float = 10.0,
    label_smoothing: float = 0.0,
    attention: str = "sdpa",
    teacher_attention: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(consistency loss, weighted AR loss), scalars, of one :class:`PackedCollator` batch.

    One forward with gradients over the packed rows (plus one over the AR rows when the batch has
    them); with ``teacher_input_ids`` (local loss) one more without gradients over the packed rows
    with the teacher states. ``teacher_attention`` (default ``attention``) may differ: FlexAttention
    has no backward on CPU but runs forwards.
    """
    logits = packed_logits(model, batch["input_ids"], batch, attention=attention)
    flat = logits.flatten(0, 1)
    student = flat[batch["student_index"]]
    if "teacher_input_ids" in batch:
        with torch.no_grad():
            teacher_logits = packed_logits(model, batch["teacher_input_ids"], batch, teacher_attention or attention)
        teacher = teacher_logits.flatten(0, 1)[batch["teacher_index"]]
    else:
        teacher = flat[batch["teacher_index"]].detach()  # stop-gradient, as the unpacked no_grad teacher
    consistency = consistency_loss(student, teacher, batch["student_block"], batch["teacher_block"], batch["slot_mask"])
    if "ar_input_ids" in batch:
        ar_logits = model(
            input_ids=batch["ar_input_ids"], attention_mask=batch["ar_attention_mask"], use_cache=False
        ).logits
        autoregressive = ar_loss(ar_logits, batch["ar_labels"], ar_weight, label_smoothing)
    else:
        autoregressive = ar_loss(logits, batch["ar_labels"], ar_weight, label_smoothing)
    return consistency, autoregressive


class PackedConsistencyTrainer(ConsistencyTrainer):
    """:class:`ConsistencyTrainer` on :class:`PackedTrajectories` with a :class:`PackedCollator`
    (made when none is given); ``attention``: ``"sdpa"`` or ``"flex"`` (see :func:`packed_losses`)."""

    def __init__(self, *args, attention: str = "sdpa", teacher_attention: str | None = None, **kwargs):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if teacher_attention is not None and teacher_attention not in ATTENTIONS:
            raise ValueError(f"teacher_attention must be one of {ATTENTIONS}, got {teacher_attention!r}")
        if kwargs.get("data_collator") is None:
            training_args = kwargs.get("args") or (args[1] if len(args) > 1 else None)
            kwargs["data_collator"] = PackedCollator(
                loss=kwargs.get("loss", "global"), seed=getattr(training_args, "seed", 0)
            )
        elif not isinstance(kwargs["data_collator"], PackedCollator):
            raise TypeError("PackedConsistencyTrainer needs a PackedCollator as data_collator")
        super().__init__(*args, **kwargs)
        self.attention = attention
        self.teacher_attention = teacher_attention
        self.samples_seen = 0

    def _get_train_sampler(self, *args, **kwargs):
        # Packed rows range from ~150 to ~750 tokens on GSM8K: batches of similar lengths (random
        # megabatches of 50 batches, sorted within; transformers' LengthGroupedSampler) waste far
        # less on padding than random batches. Its shuffling uses torch's global RNG, which the
        # trainer seeds and restores on resume, like the default RandomSampler.
        from transformers.trainer_pt_utils import LengthGroupedSampler

        dataset = self.train_dataset
        if not isinstance(dataset, PackedTrajectories):
            return super()._get_train_sampler(*args, **kwargs)
        # The global batch: under DDP/FSDP every process then sees the slices of the same global
        # order that one process with as many accumulation steps would see.
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedSampler(batch, lengths=dataset.lengths)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        consistency, autoregressive = packed_losses(
            model, inputs, self.ar_weight, self.ar_label_smoothing, self.attention, self.teacher_attention
        )
        loss = consistency + autoregressive
        self.samples_seen += int(inputs["student_index"].shape[0])
        self._loss_sums["consistency_loss"] += float(consistency.detach())
        self._loss_sums["ar_loss"] += float(autoregressive.detach())
        self._loss_count += 1
        return (loss, {}) if return_outputs else loss
