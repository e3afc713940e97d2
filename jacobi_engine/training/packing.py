"""Packed consistency training: every chunk of a prompt in one sequence, with a noise-aware mask.

The unpacked trainer spends one student forward, one teacher forward and one AR row per
(prompt, chunk) sample, each re-reading the prompt and all chunks before it. Packed, one row
holds one prompt and all K chunks of its output (the trajectory dataset's rows of that prompt):

    tokens     [ prompt | y*_0 | y*_1 | ... | y*_{K-1} | s_0 | s_1 | ... | s_{K-1} ]
    positions  [ 0..P-1 | P..  | ...                    | P..  | ... (same as y*_k)  ]

``y*_k`` is chunk k's fixed point (clean) and ``s_k`` a state drawn from its trajectory
(noisy), at the positions ``y*_k`` has, which are the positions the unpacked sample gives it.
The mask (:func:`packed_mask_mod`):

* prompt and clean tokens attend causally to prompt and clean tokens: this part is exactly
  ``[x; y*]`` for every chunk at once, so it yields the global loss's teacher logits (detached)
  and the default AR term (labels on every chunk token);
* a noisy block ``s_k`` attends to the prompt, to the clean chunks before it (``x`` of the
  unpacked sample, i.e. the prompt + the converged chunks) and causally to itself: its logits are
  those of the unpacked student ``[x; s_k]``;
* nothing attends to a noisy block from outside it, and padding attends only to itself.

So the logits, losses and gradients equal the unpacked trainer's on the same samples (the
gradient also flows through ``x`` in both: the unpacked student row recomputes ``x`` with
gradients). The local loss's teacher (the next state) is packed the same way, in a second
forward without gradients. An ``ar_data``/``use_labels`` AR row is one extra causal row per
prompt (the unpacked trainer draws one per chunk sample).

The mask reaches the model as a 4-D mask: transformers' mask creation returns a 4-D tensor or a
``BlockMask`` as is (``masking_utils._preprocess_mask_arguments``), and the model's attention
function is switched to :data:`PACKED_ATTENTION`, registered with ``AttentionInterface``: it
hands a boolean mask to transformers' SDPA function and a ``BlockMask`` to its FlexAttention
function (GQA, scaling, soft-capping as those implement them). ``AttentionMaskInterface`` gets
the SDPA mask builder under the same name, so plain 2-D ``attention_mask`` calls (evaluation,
generation) keep working on a model switched to it. Any model that routes attention through
``AttentionInterface`` and takes ``position_ids`` works (Llama, Qwen2, Mistral, GPT-2, ...).

FlexAttention has no backward on CPU (torch 2.14: "FlexAttention does not support backward on
CPU"), so training on CPU uses SDPA; FlexAttention serves gradient-free forwards there (the
local loss's teacher) and training on GPUs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from jacobi_engine.training.losses import IGNORE_INDEX, ar_loss, consistency_loss
from jacobi_engine.training.trainer import ConsistencyTrainer, TrajectoryCollator, pick_states

PACKED_ATTENTION = "jacobi_packed"
ATTENTIONS = ("sdpa", "flex")
PROMPT_CHUNK = -1  # chunk id of prompt tokens (and of ar_data rows, which are plain causal rows)
PAD_CHUNK = -2  # chunk id of padding


# -- attention plumbing ---------------------------------------------------------------------------
def _softcapped_attention(module, query, key, value, mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    # transformers' SDPA function refuses soft-capping (Gemma 2) and each model keeps its eager
    # function to itself, so the few lines of math are here.
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _packed_attention(module, query, key, value, attention_mask, **kwargs):
    """AttentionInterface entry: q [B, Hq, L, D], k/v [B, Hkv, L, D], mask bool [B, 1, L, L] or a
    ``BlockMask`` -> ([B, L, Hq, D], weights or None), by transformers' SDPA or FlexAttention function
    (soft-capped logits with a boolean mask: by the math above)."""
    from torch.nn.attention.flex_attention import BlockMask

    if kwargs.get("s_aux") is not None:
        raise ValueError("packed training does not support attention sinks (s_aux)")
    if isinstance(attention_mask, BlockMask):
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("softcap") is not None and attention_mask is not None:
        return _softcapped_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def use_packed_attention(model) -> str:
    """Switch ``model`` to :data:`PACKED_ATTENTION`; returns the implementation it had (to restore
    before saving or decoding elsewhere). The name is not saved with the config."""
    previous = model.config._attn_implementation
    if previous != PACKED_ATTENTION:
        model.set_attn_implementation(PACKED_ATTENTION)
        if model.config._attn_implementation != PACKED_ATTENTION:
            raise ValueError(
                f"{type(model).__name__} cannot switch its attention implementation (it does not route attention "
                "through transformers' AttentionInterface), so packed training cannot give it its mask"
            )
    return previous


def packed_mask_mod(
    chunk_id: torch.Tensor, noisy: torch.Tensor, position_ids: torch.Tensor | None = None, window: int | None = None
):
    """The noise-aware mask as a FlexAttention ``mask_mod(b, h, q, kv) -> bool``.

    ``chunk_id`` int [R, L]: -1 prompt, k for clean chunk k and for noisy block k, -2 padding;
    ``noisy`` bool [R, L]. With ``window`` (a sliding-window layer), a query also sees only keys
    whose position (``position_ids`` int [R, L]) is less than ``window`` behind its own, as the
    unpacked sample's sliding-window mask does. Also evaluates on broadcast index tensors
    (:func:`dense_packed_mask`).
    """

    def mask_mod(b, h, q, kv):
        q_chunk, kv_chunk = chunk_id[b, q], chunk_id[b, kv]
        q_noisy, kv_noisy = noisy[b, q], noisy[b, kv]
        causal = kv <= q
        clean_to_clean = ~q_noisy & ~kv_noisy & causal
        noisy_to_context = q_noisy & ~kv_noisy & (kv_chunk < q_chunk)
        noisy_to_itself = q_noisy & kv_noisy & (kv_chunk == q_chunk) & causal
        allowed = (
            (clean_to_clean | noisy_to_context | noisy_to_itself) & (q_chunk != PAD_CHUNK) & (kv_chunk != PAD_CHUNK)
        )
        if window is not None:
            allowed = allowed & (position_ids[b, q] - position_ids[b, kv] < window)
        # A padding query attends to itself only: a row with no key would give NaN in SDPA.
        return allowed | (q == kv)

    return mask_mod


def dense_packed_mask(chunk_id, noisy, position_ids=None, window=None) -> torch.Tensor:
    """The mask of :func:`packed_mask_mod` as a boolean tensor [R, 1, L, L] (True: attend)."""
    rows, length = chunk_id.shape
    device = chunk_id.device
    b = torch.arange(rows, device=device)[:, None, None, None]
    q = torch.arange(length, device=device)[None, None, :, None]
    kv = torch.arange(length, device=device)[None, None, None, :]
    return packed_mask_mod(chunk_id, noisy, position_ids, window)(b, 0, q, kv)


def block_packed_mask(chunk_id, noisy, position_ids=None, window=None):
    """The mask of :func:`packed_mask_mod` as a FlexAttention ``BlockMask`` (one head, broadcast)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = chunk_id.shape
    mask_mod = packed_mask_mod(chunk_id, noisy, position_ids, window)
    return create_block_mask(mask_mod, rows, None, length, length, device=chunk_id.device)


def model_attention_mask(config, chunk_id, noisy, position_ids, attention: str = "sdpa"):
    """What to pass as ``attention_mask``: one 4-D mask, or, for a model mixing full and
    sliding-window layers (``config.layer_types``), the dict of both that such models accept."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    build = dense_packed_mask if attention == "sdpa" else block_packed_mask
    window = getattr(text_config, "sliding_window", None)
    layer_types = set(getattr(text_config, "layer_types", None) or [])
    if layer_types:
        if "sliding_attention" not in layer_types:
            window = None
        elif layer_types - {"sliding_attention"}:
            return {
                "full_attention": build(chunk_id, noisy),
                "sliding_attention": build(chunk_id, noisy, position_ids, window),
            }
    return build(chunk_id, noisy, position_ids, window) if window else build(chunk_id, noisy)


def packed_logits(model, input_ids, position_ids, chunk_id, noisy, attention: str = "sdpa") -> torch.Tensor:
    """Logits [R, L, V] of packed rows (int64 [R, L] ids and positions; layout tensors as in
    :func:`packed_mask_mod`). ``attention``: ``"sdpa"`` (boolean mask) or ``"flex"`` (BlockMask)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    inner = getattr(model, "module", model)  # DDP wraps the model
    use_packed_attention(inner)
    mask = model_attention_mask(inner.config, chunk_id, noisy, position_ids, attention)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False).logits


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
    the unpacked sample (p, k), same key, same schedule, so both train on the same samples.
    Returns (R = B packed rows + B AR rows with ``ar_corpus``/``use_labels``, else R = B;
    L = longest row rounded up to ``pad_to_multiple``; N = chunks; n = longest chunk):

    * ``input_ids``, ``position_ids``, ``chunk_id`` int64 [R, L]; ``noisy`` bool [R, L];
    * ``ar_labels`` int64 [R, L]: clean chunk tokens (default) or the AR rows' answers, else -100;
    * ``student_index``, ``teacher_index`` int64 [N, n]: flat indices into [R * L] of each
      sample's student block (its noisy block) and teacher block (its clean chunk for ``global``;
      the noisy block of ``teacher_input_ids`` for ``local``, i.e. the same indices);
    * ``student_block``, ``teacher_block`` int64 [N, n]; ``slot_mask`` bool [N, n];
    * ``teacher_input_ids`` int64 [B, L], ``local`` only: the packed rows with the next states;
    * ``noise_progress`` float scalar: the training progress the noise schedule used.
    """

    pad_to_multiple: int = 1

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        progress = self.next_progress()
        rows, positions, chunk_ids, noisy_flags, labels, teacher_rows = [], [], [], [], [], []
        student_slots, teacher_slots, student_blocks, teacher_blocks = [], [], [], []
        ar_rows, ar_starts = [], []
        for record in records:
            prompt = record["prompt_ids"]
            clean, noisy, teacher_noisy, clean_ids = [], [], [], []
            chunk_starts = []
            for chunk, (chunk_index, fixed_point, states) in enumerate(
                zip(record["chunk_indices"], record["fixed_points"], record["states"])
            ):
                rng = self._rng(record, chunk_index)
                student, teacher = pick_states(states, self.loss, rng, self.noise_schedule, progress)
                chunk_starts.append(len(prompt) + len(clean))
                clean += fixed_point
                noisy += student
                teacher_noisy += teacher
                clean_ids += [chunk] * len(fixed_point)
                student_blocks.append(list(student))
                teacher_blocks.append(list(teacher))
            row_index = len(rows)
            prompt_length, output_length = len(prompt), len(clean)
            rows.append(prompt + clean + noisy)
            teacher_rows.append(prompt + clean + teacher_noisy)
            # A noisy block sits at its clean chunk's positions and carries its chunk id.
            output_positions = list(range(prompt_length, prompt_length + output_length))
            positions.append(list(range(prompt_length)) + output_positions + output_positions)
            chunk_ids.append([PROMPT_CHUNK] * prompt_length + clean_ids + clean_ids)
            noisy_flags.append([False] * (prompt_length + output_length) + [True] * output_length)
            chunk_labels = clean if self._ar_on_chunks else [IGNORE_INDEX] * output_length
            labels.append([IGNORE_INDEX] * prompt_length + chunk_labels + [IGNORE_INDEX] * output_length)
            for start, fixed_point in zip(chunk_starts, record["fixed_points"]):
                size = len(fixed_point)
                clean_columns = list(range(start, start + size))
                noisy_columns = [column + output_length for column in clean_columns]
                student_slots.append((row_index, noisy_columns))
                teacher_slots.append((row_index, noisy_columns if self.loss == "local" else clean_columns))
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
        for ids, start in zip(ar_rows, ar_starts):
            rows.append(ids)
            positions.append(list(range(len(ids))))
            chunk_ids.append([PROMPT_CHUNK] * len(ids))
            noisy_flags.append([False] * len(ids))
            labels.append([IGNORE_INDEX] * start + list(ids[start:]))

        width = max(len(ids) for ids in rows)
        width = -(-width // self.pad_to_multiple) * self.pad_to_multiple
        n = max(len(block) for block in student_blocks)
        student_index = torch.zeros((len(student_slots), n), dtype=torch.long)
        teacher_index = torch.zeros_like(student_index)
        for sample, ((row, student_columns), (_, teacher_columns)) in enumerate(zip(student_slots, teacher_slots)):
            student_index[sample, : len(student_columns)] = row * width + torch.tensor(student_columns)
            teacher_index[sample, : len(teacher_columns)] = row * width + torch.tensor(teacher_columns)
        block_lengths = torch.tensor([len(block) for block in student_blocks])
        batch = {
            "input_ids": _pad_rows(rows, width, self.pad_id),
            "position_ids": _pad_rows(positions, width, 0),
            "chunk_id": _pad_rows(chunk_ids, width, PAD_CHUNK),
            "noisy": _pad_rows([[int(flag) for flag in flags] for flags in noisy_flags], width, 0).bool(),
            "ar_labels": _pad_rows(labels, width, IGNORE_INDEX),
            "student_index": student_index,
            "teacher_index": teacher_index,
            "student_block": _pad_rows(student_blocks, n, self.pad_id),
            "teacher_block": _pad_rows(teacher_blocks, n, self.pad_id),
            "slot_mask": torch.arange(n)[None, :] < block_lengths[:, None],
            "noise_progress": torch.tensor(progress),
        }
        if self.loss == "local":
            batch["teacher_input_ids"] = _pad_rows(teacher_rows, width, self.pad_id)
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

    One forward with gradients over all rows; with ``teacher_input_ids`` (local loss) a second
    one without gradients over the packed rows with the teacher states. ``teacher_attention``
    (default ``attention``) may differ: FlexAttention has no backward on CPU but runs forwards.
    """
    layout = (batch["position_ids"], batch["chunk_id"], batch["noisy"])
    logits = packed_logits(model, batch["input_ids"], *layout, attention=attention)
    flat = logits.flatten(0, 1)
    student = flat[batch["student_index"]]
    if "teacher_input_ids" in batch:
        rows = batch["teacher_input_ids"].shape[0]
        with torch.no_grad():
            teacher_layout = tuple(tensor[:rows] for tensor in layout)
            teacher_logits = packed_logits(
                model, batch["teacher_input_ids"], *teacher_layout, attention=teacher_attention or attention
            )
        teacher = teacher_logits.flatten(0, 1)[batch["teacher_index"]]
    else:
        teacher = flat[batch["teacher_index"]].detach()  # stop-gradient, as the unpacked no_grad teacher
    consistency = consistency_loss(student, teacher, batch["student_block"], batch["teacher_block"], batch["slot_mask"])
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
