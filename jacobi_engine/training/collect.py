"""Jacobi trajectory collection: the training data of consistency (CLLM) training.

The engine decodes batches of prompts in chunked mode (batched, KV-cached) and records every
state each n-token chunk went through. One dataset row per (prompt, chunk):

    prompt_index   int        line of the prompts file
    chunk_index    int        0, 1, ... in generation order
    prompt_length  int        tokens of the real prompt at the start of ``prompt_ids``
    prompt_ids     [int]      x: the real prompt + the chunks converged before this one
    states         [[int]]    every block fed to the model over this chunk, in order; each has
                              m = len(fixed_point) tokens and slot 0 is already correct
    fixed_point    [int]      y*: the converged (greedy) tokens; always equal to ``states[-1]``
    label_ids      [int]      tokenized ground-truth answer + EOS ([] when the prompt has none)

``m`` is ``block_size`` except in the last chunk of a sequence that ended (EOS or
``max_new_tokens``) inside it. There the engine stops as soon as the final tokens are known,
before feeding the converged block, so the fixed point is appended as the last state. When the
very last token was produced by the forward that converged the previous chunk, it gets a chunk
of its own with the single state ``[token]``: the chunks of a prompt always tile its output.

Resumable. Prompts are split into fixed batches (batch k = prompts ``[k*B, (k+1)*B)``) and the
random initial guesses of batch k are seeded with ``seed + k``, so a batch redone after a kill
yields the same rows. Each finished batch is written to ``out_dir/shards/batch-XXXXXX.jsonl``
(temporary file, then rename), and only then recorded in ``out_dir/manifest.json`` (rewritten
the same atomic way). A rerun skips the batches the manifest lists and overwrites any shard it
does not list; the dataset is assembled from the listed shards only, so no row is lost or
duplicated whenever the process dies. The final dataset is saved with ``save_to_disk(out_dir)``.
The files, what a resume must match (the settings, the prompts, the model's weights), how every
listed shard is validated and how the dataset is assembled live in :mod:`jacobi_engine.training.shards`.

Several processes (torchrun, accelerate launch; torch.distributed initialised): rank r of W
decodes the batches k with ``k % W == r`` that no manifest lists yet, and records them in its own
``out_dir/manifest-rank-<r>.json``, so ranks never write the same file. Batch k holds the same
prompts and guesses whichever rank decodes it, so the merged dataset equals a single-process
collection. After a barrier, rank 0 folds the rank manifests into ``manifest.json`` (checking that
every batch is there) and assembles the dataset. A rerun, with any number of processes, skips
every batch any manifest lists.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import torch

from jacobi_engine.engine import JacobiEngine
from jacobi_engine.training.distributed import world
from jacobi_engine.training.shards import (
    MANIFEST,
    MANIFEST_VERSION,
    SHARDS,
    all_manifests,
    assemble_dataset,
    check_config,
    merge_manifests,
    prompts_sha256,
    rank_manifest_name,
    read_shard,
    vocab_size,
    weights_sha256,
    write_manifest,
    write_shard,
)

LABEL_FIELDS = ("answer", "label")


# -- prompts -------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[dict]:
    """Read a JSONL file: one object per line with a ``"prompt"`` text and optionally an
    ``"answer"`` or ``"label"`` text (the ground truth). Blank lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            records.append(_normalise_prompt(record, f"{path}:{number}"))
    return records


def _normalise_prompt(item, where: str) -> dict:
    if isinstance(item, str):
        return {"prompt": item, "answer": None}
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise ValueError(f"{where}: expected a string or an object with a 'prompt' string, got {item!r:.80}")
    answer = next((item[key] for key in LABEL_FIELDS if item.get(key) is not None), None)
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"{where}: 'answer'/'label' must be a string, got {type(answer).__name__}")
    return {"prompt": item["prompt"], "answer": answer}


def _tokenize(tokenizer, records: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    prompt_ids, label_ids = [], []
    eos = getattr(tokenizer, "eos_token_id", None)
    for index, record in enumerate(records):
        ids = list(tokenizer(record["prompt"])["input_ids"])
        if not ids:
            raise ValueError(f"prompt {index} tokenizes to no tokens: {record['prompt']!r:.80}")
        prompt_ids.append(ids)
        labels: list[int] = []
        if record["answer"] is not None:
            labels = list(tokenizer(record["answer"], add_special_tokens=False)["input_ids"])
            if eos is not None:
                labels.append(int(eos))
        label_ids.append(labels)
    return prompt_ids, label_ids


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` int64 [B, max_len], padded on the left."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


# -- per-chunk records ---------------------------------------------------------------------------
def longest_run(tokens: list[int]) -> int:
    """Length of the longest run of identical consecutive tokens (0 for an empty list)."""
    best = run = 0
    previous = None
    for token in tokens:
        run = run + 1 if token == previous else 1
        previous = token
        best = max(best, run)
    return best


def augment_states(
    states: list[list[int]], fixed_point: list[int], fraction: float, rng: random.Random
) -> list[list[int]]:
    """CLLM's data augmentation: in every intermediate state, replace a random ``fraction`` of
    the wrong tokens after the first wrong one with their fixed-point values.

    The first wrong slot stays wrong, so a state never becomes the fixed point and the positions
    the consistency loss covers are unchanged; later tokens become "already correct" more often,
    as they do in a model that is learning. The fixed point (last state) is kept as is. Meant
    for the global loss: augmented neighbours are no longer one Jacobi step apart.
    """
    augmented = []
    for state in states[:-1]:
        wrong = [slot for slot, (token, target) in enumerate(zip(state, fixed_point)) if token != target]
        candidates = wrong[1:]
        chosen = rng.sample(candidates, int(len(candidates) * fraction))
        new_state = list(state)
        for slot in chosen:
            new_state[slot] = fixed_point[slot]
        augmented.append(new_state)
    augmented.append(list(states[-1]))
    return augmented


def chunk_rows(
    trajectory,
    prompt_index: int,
    prompt_ids: list[int],
    label_ids: list[int],
    max_repeat: int = 10,
    augment_fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[dict], int]:
    """Dataset rows of one sequence's trajectory, and how many chunks were dropped as degenerate.

    A chunk is degenerate when the generated text up to its end (this chunk and the chunks
    before it, not the user's prompt) holds ``max_repeat`` or more identical consecutive tokens.
    """
    tokens = trajectory.tokens
    blocks = [(block.start, list(block.fixed_point), block.states) for block in trajectory.blocks()]
    covered = blocks[-1][0] + len(blocks[-1][1]) if blocks else 0
    if covered < len(tokens):
        # The last token came from the final forward of the last chunk (or from the prefill),
        # and generation stopped there: no Jacobi step ever covered it. A one-state chunk keeps
        # it (often the EOS) in the data, so the chunks always tile the whole output.
        blocks.append((covered, tokens[covered:], [tokens[covered:]]))
    rows, dropped = [], 0
    for chunk_index, (start, fixed_point, fed_states) in enumerate(blocks):
        size = len(fixed_point)
        if longest_run(tokens[: start + size]) >= max_repeat:
            dropped += 1
            continue
        states = [list(state[:size]) for state in fed_states]
        if states[-1] != fixed_point:
            states.append(fixed_point)
        if augment_fraction:
            rng = random.Random(f"{seed}:{prompt_index}:{chunk_index}")
            states = augment_states(states, fixed_point, augment_fraction, rng)
        rows.append(
            {
                "prompt_index": prompt_index,
                "chunk_index": chunk_index,
                "prompt_length": len(prompt_ids),
                "prompt_ids": list(prompt_ids) + list(tokens[:start]),
                "states": states,
                "fixed_point": fixed_point,
                "label_ids": list(label_ids),
            }
        )
    return rows, dropped


# -- the loop ----------------------------------------------------------------------------------------
def collect_trajectories(
    model,
    tokenizer,
    prompts: Iterable[str | dict],
    out_dir: str | Path,
    block_size: int,
    max_new_tokens: int,
    batch_size: int = 8,
    *,
    eos_token_id: int | list[int] | None = None,
    augment: bool = False,
    augment_fraction: float = 0.5,
    max_repeat: int = 10,
    seed: int = 0,
    progress: bool = True,
):
    """Collect Jacobi trajectories of ``model`` on ``prompts`` and save them as a HF dataset.

    ``prompts``: strings, or dicts with a ``"prompt"`` string and optionally an ``"answer"`` or
    ``"label"`` string (ground truth, stored tokenized + EOS as ``label_ids``). Prompts are
    tokenized one by one with ``tokenizer`` (special tokens included) and left-padded per batch.
    ``eos_token_id``: None = the model's generation config, ``[]`` = never stop early.
    ``augment``: CLLM's augmentation (see :func:`augment_states`). Chunks whose generated text
    has ``max_repeat`` identical consecutive tokens are dropped.

    Calling it again with the same arguments on the same ``out_dir`` resumes (or, when the
    collection is complete, just reassembles the dataset). Returns the ``datasets.Dataset``; raises
    ValueError when no chunk survived the degenerate filter (see :func:`~jacobi_engine.training.shards.assemble_dataset`).
    With torch.distributed initialised, every process of the group must call it with the same
    arguments and its own model copy; each decodes its share of the batches (module docstring),
    and all of them return the merged dataset.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or block_size < 1 or max_new_tokens < 1 or max_repeat < 2:
        raise ValueError("batch_size, block_size and max_new_tokens must be >= 1 and max_repeat >= 2")
    if not 0.0 <= augment_fraction <= 1.0:
        raise ValueError(f"augment_fraction must be in [0, 1], got {augment_fraction}")
    records = [_normalise_prompt(item, f"prompt {index}") for index, item in enumerate(prompts)]
    prompt_ids, label_ids = _tokenize(tokenizer, records)
    if eos_token_id is not None and not isinstance(eos_token_id, int):
        eos_token_id = [int(token) for token in eos_token_id]  # a list survives the JSON manifest
    out_dir = Path(out_dir)
    (out_dir / SHARDS).mkdir(parents=True, exist_ok=True)

    config = {
        "version": MANIFEST_VERSION,
        "model": str(getattr(model.config, "_name_or_path", "")) or type(model).__name__,
        "block_size": block_size,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "eos_token_id": eos_token_id,
        "augment_fraction": augment_fraction if augment else None,
        "max_repeat": max_repeat,
        "seed": seed,
        "num_prompts": len(records),
        "prompts_sha256": prompts_sha256(prompt_ids, label_ids),
        "vocab_size": vocab_size(model),
        "model_sha256": weights_sha256(model),
    }
    rank, world_size = world()
    manifests = all_manifests(out_dir)
    check_config(out_dir, manifests, config)
    listed = {int(key): batch for manifest in manifests.values() for key, batch in manifest["batches"].items()}
    for batch_index in sorted(listed):  # a bad shard is reported now, not after decoding the rest
        read_shard(out_dir, batch_index, listed[batch_index], config)
    done = set(listed)
    # Each process writes only its own manifest; a single process writes the merged one.
    own_name = MANIFEST if world_size == 1 else rank_manifest_name(rank)
    manifest = {"config": config, "batches": dict(manifests.get(own_name, {}).get("batches", {}))}
    if world_size == 1:
        for other in manifests.values():  # an earlier multi-process run's batches count too
            manifest["batches"].update(other["batches"])
    write_manifest(out_dir, manifest, own_name)

    num_batches = (len(records) + batch_size - 1) // batch_size
    # A fixed owner per batch (not a share of what is left), so that ranks agree on the split
    # without talking to each other, even while another rank is already recording batches.
    mine = [k for k in range(num_batches) if k % world_size == rank]
    todo = [k for k in mine if k not in done]
    prompts_of = {k: min(batch_size, len(records) - k * batch_size) for k in mine}
    engine = JacobiEngine(model, block_size=block_size, mode="chunked", init="random_prompt", seed=seed)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=sum(prompts_of.values()),
        initial=sum(prompts_of[k] for k in mine if k in done),
        unit="prompt",
        desc="collect" if world_size == 1 else f"collect (rank {rank} of {world_size})",
        disable=not progress or rank != 0,
    )
    try:
        for batch_index in todo:
            first = batch_index * batch_size
            indices = list(range(first, min(first + batch_size, len(records))))
            input_ids, attention_mask = left_pad([prompt_ids[i] for i in indices])
            engine.seed = seed + batch_index  # per batch, so a batch redone after a kill is identical
            output = engine.generate(
                input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                record_trajectory=True,
                return_stats=False,
            )
            rows, dropped = [], 0
            for index, trajectory in zip(indices, output.trajectories):
                chunk, chunk_dropped = chunk_rows(
                    trajectory,
                    index,
                    prompt_ids[index],
                    label_ids[index],
                    max_repeat=max_repeat,
                    augment_fraction=augment_fraction if augment else None,
                    seed=seed,
                )
                rows.extend(chunk)
                dropped += chunk_dropped
            write_shard(out_dir, batch_index, rows)
            manifest["batches"][str(batch_index)] = {
                "prompts": [indices[0], indices[-1] + 1],
                "samples": len(rows),
                "dropped": dropped,
            }
            write_manifest(out_dir, manifest, own_name)
            bar.update(len(indices))
            batches = manifest["batches"].values()
            bar.set_postfix(samples=sum(b["samples"] for b in batches), dropped=sum(b["dropped"] for b in batches))
    finally:
        bar.close()
        model.train(was_training)
    if world_size == 1:
        merge_manifests(out_dir, num_batches, config)
        return assemble_dataset(out_dir)
    return _merge_across_ranks(out_dir, num_batches, rank, config)


def _merge_across_ranks(out_dir: Path, num_batches: int, rank: int, config: dict):
    """Wait for every rank, let rank 0 merge the manifests and assemble; every rank returns the dataset."""
    import torch.distributed as dist
    from datasets import load_from_disk

    dist.barrier()  # every rank's shards and manifest are on disk
    error = None
    if rank == 0:
        try:
            merge_manifests(out_dir, num_batches, config)
            assemble_dataset(out_dir)
        except Exception as caught:  # other ranks must not wait forever on the second barrier
            error = caught
    failed = [error is not None]
    dist.broadcast_object_list(failed, src=0)
    if error is not None:
        raise error
    if failed[0]:
        raise RuntimeError(f"rank 0 failed to merge the collection in {out_dir}")
    return load_from_disk(str(out_dir))
