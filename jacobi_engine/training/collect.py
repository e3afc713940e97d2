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

The manifest's ``config`` pins what a resume must match: the settings, the prompts (a hash) and
the model's weights (:func:`weights_sha256`, a sha256 over every weight's bytes, ~0.2 s for 135M
bf16 parameters on one CPU core), so a model retrained or converted in place since cannot resume
into a mixed collection. A manifest of version 1 (written before weights were recorded) is
accepted with a warning, and its config takes the current model's hash from then on. Every
listed shard is validated against the manifest (:func:`read_shard`) before a resume decodes
anything and when the dataset is assembled: an edited or corrupted shard is an error naming the
file, line and field, never a crash later in training or a silently cut prompt.

Several processes (torchrun, accelerate launch; torch.distributed initialised): rank r of W
decodes the batches k with ``k % W == r`` that no manifest lists yet, and records them in its own
``out_dir/manifest-rank-<r>.json``, so ranks never write the same file. Batch k holds the same
prompts and guesses whichever rank decodes it, so the merged dataset equals a single-process
collection. After a barrier, rank 0 folds the rank manifests into ``manifest.json`` (checking that
every batch is there) and assembles the dataset. A rerun, with any number of processes, skips
every batch any manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from jacobi_engine.engine import JacobiEngine
from jacobi_engine.training.distributed import world

MANIFEST = "manifest.json"
RANK_MANIFEST_GLOB = "manifest-rank-*.json"
SHARDS = "shards"
MANIFEST_VERSION = 2  # 2: config records vocab_size and model_sha256
FIELDS = ("prompt_index", "chunk_index", "prompt_length", "prompt_ids", "states", "fixed_point", "label_ids")
LABEL_FIELDS = ("answer", "label")


def dataset_features():
    from datasets import Features, Sequence, Value  # Sequence, not List: datasets 3.x has no List

    ids = Sequence(Value("int64"))
    return Features(
        {
            "prompt_index": Value("int64"),
            "chunk_index": Value("int64"),
            "prompt_length": Value("int64"),
            "prompt_ids": ids,
            "states": Sequence(ids),
            "fixed_point": ids,
            "label_ids": ids,
        }
    )


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


# -- files ------------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_manifest(out_dir: Path, manifest: dict, name: str = MANIFEST) -> None:
    _atomic_write(out_dir / name, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(out_dir: Path, name: str = MANIFEST) -> dict | None:
    path = Path(out_dir) / name
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def rank_manifest_name(rank: int) -> str:
    return f"manifest-rank-{rank:05d}.json"


def _all_manifests(out_dir: Path) -> dict[str, dict]:
    """Every manifest in ``out_dir`` by file name: the merged one and those of ranks of any earlier run."""
    names = [MANIFEST] + sorted(path.name for path in out_dir.glob(RANK_MANIFEST_GLOB))
    manifests = {name: read_manifest(out_dir, name) for name in names}
    return {name: manifest for name, manifest in manifests.items() if manifest is not None}


def _check_config(out_dir: Path, manifests: dict[str, dict], config: dict) -> None:
    """Refuse to resume a collection made with other settings, prompts or model weights."""
    unverified = []
    for name, manifest in manifests.items():
        recorded = manifest["config"]
        if recorded.get("version") == 1:  # written before the weights were recorded: check the rest
            unverified.append(name)
            recorded = {**recorded, **{key: config[key] for key in ("version", "vocab_size", "model_sha256")}}
        if recorded.get("model_sha256") != config["model_sha256"]:
            raise ValueError(
                f"{out_dir} holds trajectories of a model whose weights have sha256 {recorded.get('model_sha256')}, "
                f"but the model given now ({config['model']}) has weights sha256 {config['model_sha256']}: its "
                "weights (or their dtype) changed since, and resuming would mix the trajectories of two models. "
                "Collect into a new --out directory, or load the original weights to resume"
            )
        if recorded != config:
            changed = sorted(key for key in config if recorded.get(key) != config[key])
            raise ValueError(
                f"{out_dir} holds a collection made with different settings ({', '.join(changed)}); "
                "use a new --out directory or the original settings to resume"
            )
    if unverified:
        warnings.warn(
            f"{out_dir}: {', '.join(unverified)} predate(s) recording the model's weights, so it cannot be checked "
            f"that {config['model']} still has the weights the recorded batches were decoded with; resuming, and "
            "recording the current weights' hash from now on",
            stacklevel=3,
        )


def merge_manifests(out_dir: str | Path, num_batches: int, config: dict | None = None) -> dict:
    """Fold the rank manifests into ``manifest.json`` and remove them; every batch must be listed.

    ``config``: the merged manifest's (default: the first manifest's; the collection passes its own,
    which a version-1 manifest then takes)."""
    out_dir = Path(out_dir)
    manifests = _all_manifests(out_dir)
    if not manifests:
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}")
    merged = {"config": config or next(iter(manifests.values()))["config"], "batches": {}}
    for manifest in manifests.values():
        merged["batches"].update(manifest["batches"])
    missing = sorted(set(range(num_batches)) - {int(key) for key in merged["batches"]})
    if missing:
        raise RuntimeError(f"batches {missing[:10]} of {out_dir} were decoded by no process")
    write_manifest(out_dir, merged)
    for name in manifests:  # only once the merged manifest is safely on disk
        if name != MANIFEST:
            (out_dir / name).unlink()
    return merged


def _shard_name(batch_index: int) -> str:
    return f"batch-{batch_index:06d}.jsonl"


def _fingerprint(prompt_ids: list[list[int]], label_ids: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for prompt, labels in zip(prompt_ids, label_ids):  # one prompt at a time: no giant string
        digest.update(json.dumps([prompt, labels], separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def assemble_dataset(out_dir: str | Path):
    """Build the dataset from the shards the manifest lists, in batch order, and save it to ``out_dir``.

    Each shard is validated first (:func:`read_shard`): a bad one raises ValueError naming it.
    Raises ValueError when the shards hold no sample (every chunk dropped as degenerate, or no
    prompts): an empty dataset is nothing to train on (``train_consistency`` refuses one)."""
    from datasets import Dataset, concatenate_datasets

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}")
    features = dataset_features()
    parts, seen = [], set()
    for batch_index in sorted(int(key) for key in manifest["batches"]):
        rows = read_shard(out_dir, batch_index, manifest["batches"][str(batch_index)], manifest["config"])
        for row in rows:
            key = (row["prompt_index"], row["chunk_index"])
            if key in seen:
                raise RuntimeError(f"duplicate sample {key} in {out_dir / SHARDS}")
            seen.add(key)
        if rows:
            parts.append(Dataset.from_list(rows, features=features))
    if not parts:
        raise ValueError(_no_samples_message(out_dir, manifest))
    dataset = concatenate_datasets(parts)
    dataset.save_to_disk(str(out_dir))
    return dataset


def _no_samples_message(out_dir: Path, manifest: dict) -> str:
    """Why a collection holds no sample: no prompts, or every chunk dropped as degenerate."""
    batches = manifest["batches"].values()
    prompts = sum(batch["prompts"][1] - batch["prompts"][0] for batch in batches)
    dropped = sum(batch.get("dropped", 0) for batch in batches)
    if prompts == 0:
        return f"no trajectories in {out_dir}: the collection was given no prompts"
    if dropped == 0:
        return f"no trajectories in {out_dir}: {prompts} prompts were decoded but no chunk was recorded"
    max_repeat = manifest["config"]["max_repeat"]
    return (
        f"no trajectories survived in {out_dir}: all {dropped} chunks of the {prompts} prompts were dropped as "
        f"degenerate (their generated text holds {max_repeat} or more identical consecutive tokens). The model "
        "repeats itself: check it (an untrained teacher?), or collect again into a new output directory with a "
        "larger max_repeat (--max-repeat); no dataset was saved"
    )


# -- what a resume must match ----------------------------------------------------------------------
def vocab_size(model) -> int:
    """Rows of the model's input embedding: every token id must be below it."""
    embedding = model.get_input_embeddings()
    return int(getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0])


def weights_sha256(model) -> str:
    """sha256 hex digest of the model's weights: each state-dict entry's name, dtype, shape and bytes, in order.

    Deterministic across processes, devices and runs (bytes, no float sums); changes with any bit
    of any weight and with the dtype. Reads every byte (~1.5 GB/s: 0.18 s for a 135M-parameter
    model in bf16, 0.37 s in fp32, measured on this project's CPU machine). A tensor-parallel weight
    (DTensor) is gathered whole; an offloaded one (meta) contributes its name, dtype and shape only.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        if tensor.is_meta:
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


class _BadField(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _token_ids(value, field: str, vocab: int | None) -> list[int]:
    if not isinstance(value, list):
        raise _BadField(field, f"expected a list of token ids, got {type(value).__name__}")
    for position, token in enumerate(value):
        if type(token) is not int or token < 0 or (vocab is not None and token >= vocab):
            limit = f"an int in [0, {vocab})" if vocab is not None else "a non-negative int"
            raise _BadField(f"{field}[{position}]", f"{token!r:.40} is not a token id ({limit})")
    return value


def _check_row(row, batch: dict, config: dict) -> dict:
    """One shard row against the collection's invariants (see :func:`read_shard`); returns it."""
    if not isinstance(row, dict):
        raise _BadField("row", f"expected an object, got {type(row).__name__}")
    if set(row) != set(FIELDS):
        missing, extra = sorted(set(FIELDS) - set(row)), sorted(set(row) - set(FIELDS))
        raise _BadField(", ".join(missing or extra), "missing" if missing else "not a field of a trajectory row")
    for field in ("prompt_index", "chunk_index", "prompt_length"):
        if type(row[field]) is not int:
            raise _BadField(field, f"expected an int, got {row[field]!r:.40}")
    vocab = config.get("vocab_size")
    prompt_ids = _token_ids(row["prompt_ids"], "prompt_ids", vocab)
    fixed_point = _token_ids(row["fixed_point"], "fixed_point", vocab)
    _token_ids(row["label_ids"], "label_ids", vocab)
    states = row["states"]
    if not isinstance(states, list) or not states:
        raise _BadField("states", f"expected a non-empty list of states, got {states!r:.40}")
    for index, state in enumerate(states):
        _token_ids(state, f"states[{index}]", vocab)
        if len(state) != len(fixed_point):
            raise _BadField(f"states[{index}]", f"has {len(state)} tokens, the fixed point {len(fixed_point)}")
    first, end = batch["prompts"]
    if not first <= row["prompt_index"] < end:
        raise _BadField("prompt_index", f"{row['prompt_index']} is not one of this batch's prompts [{first}, {end})")
    if not 0 < row["prompt_length"] <= len(prompt_ids):
        raise _BadField("prompt_length", f"{row['prompt_length']} is not in [1, len(prompt_ids) = {len(prompt_ids)}]")
    if not 1 <= len(fixed_point) <= config["block_size"]:
        raise _BadField("fixed_point", f"has {len(fixed_point)} tokens, not 1 to block_size {config['block_size']}")
    if states[-1] != fixed_point:
        raise _BadField("fixed_point", "differs from the last state")
    generated_before = len(prompt_ids) - row["prompt_length"]  # chunks tile the output, each >= 1 token
    if not 0 <= row["chunk_index"] <= generated_before:
        raise _BadField("chunk_index", f"{row['chunk_index']} is not in [0, {generated_before}] (tokens before it)")
    if generated_before + len(fixed_point) > config["max_new_tokens"]:
        raise _BadField("prompt_ids", f"the chunk would end past max_new_tokens {config['max_new_tokens']}")
    return row


def read_shard(out_dir: str | Path, batch_index: int, batch: dict, config: dict) -> list[dict]:
    """The rows of batch ``batch_index``'s shard, validated against its manifest entry ``batch`` and ``config``.

    Every row: the fields of a trajectory row, ints where ints belong; token ids in
    ``[0, config["vocab_size"])`` (``>= 0`` when a version-1 manifest has no vocab size);
    ``prompt_index`` one of the batch's prompts; ``0 < prompt_length <= len(prompt_ids)``; a fixed
    point of 1 to ``block_size`` tokens equal to the last of its non-empty ``states``, each of its
    length; ``chunk_index`` at most the tokens generated before the chunk, which ends within
    ``max_new_tokens``. The shard holds the ``samples`` rows the manifest records. Anything else is
    a ValueError naming the shard file, line and field.
    """
    path = Path(out_dir) / SHARDS / _shard_name(batch_index)
    redo = (
        f'; the shard was edited or corrupted: delete it and batch {batch_index} from the manifest\'s "batches" '
        "to decode that batch again"
    )
    if not path.is_file():
        raise ValueError(f"{path}: the manifest lists batch {batch_index} but its shard is missing{redo}")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(_check_row(json.loads(line), batch, config))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}){redo}") from None
            except _BadField as bad:
                raise ValueError(f"{path}:{number}: field {bad.field!r}: {bad.problem}{redo}") from None
    if len(rows) != batch["samples"]:
        raise ValueError(f"{path}: holds {len(rows)} samples, the manifest records {batch['samples']}{redo}")
    return rows


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
    ValueError when no chunk survived the degenerate filter (see :func:`assemble_dataset`).
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
        "prompts_sha256": _fingerprint(prompt_ids, label_ids),
        "vocab_size": vocab_size(model),
        "model_sha256": weights_sha256(model),
    }
    rank, world_size = world()
    manifests = _all_manifests(out_dir)
    _check_config(out_dir, manifests, config)
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
            _atomic_write(
                out_dir / SHARDS / _shard_name(batch_index),
                "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows),
            )
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
