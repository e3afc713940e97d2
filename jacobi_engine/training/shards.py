"""The files of a trajectory collection (:mod:`jacobi_engine.training.collect`): shards and
manifests, what a resume must match, the validation of every shard and the dataset built from them.

    out_dir/shards/batch-XXXXXX.jsonl   one finished batch's rows (one JSON object a line)
    out_dir/manifest.json               the collection's config and the batches it holds
    out_dir/manifest-rank-<r>.json      rank r's batches, until rank 0 merges them

Every file is written to a temporary file and renamed into place (:func:`write_manifest`,
:func:`write_shard`), so a reader sees a whole file or none.

The manifest's ``config`` pins what a resume must match: the settings, the prompts (a hash) and
the model's weights (:func:`weights_sha256`, a sha256 over every weight's bytes, ~0.2 s for 135M
bf16 parameters on one CPU core), so a model retrained or converted in place since cannot resume
into a mixed collection. A manifest of version 1 (written before weights were recorded) is
accepted with a warning, and its config takes the current model's hash from then on. Every
listed shard is validated against the manifest (:func:`read_shard`) before a resume decodes
anything and when the dataset is assembled: an edited or corrupted shard is an error naming the
file, line and field, never a crash later in training or a silently cut prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

MANIFEST = "manifest.json"
RANK_MANIFEST_GLOB = "manifest-rank-*.json"
SHARDS = "shards"
MANIFEST_VERSION = 2  # 2: config records vocab_size and model_sha256
FIELDS = ("prompt_index", "chunk_index", "prompt_length", "prompt_ids", "states", "fixed_point", "label_ids")


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


def all_manifests(out_dir: Path) -> dict[str, dict]:
    """Every manifest in ``out_dir`` by file name: the merged one and those of ranks of any earlier run."""
    names = [MANIFEST] + sorted(path.name for path in out_dir.glob(RANK_MANIFEST_GLOB))
    manifests = {name: read_manifest(out_dir, name) for name in names}
    return {name: manifest for name, manifest in manifests.items() if manifest is not None}


def check_config(out_dir: Path, manifests: dict[str, dict], config: dict) -> None:
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
    manifests = all_manifests(out_dir)
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


def write_shard(out_dir: Path, batch_index: int, rows: list[dict]) -> None:
    """Writes batch ``batch_index``'s shard: its rows, one JSON object a line (atomically)."""
    _atomic_write(
        Path(out_dir) / SHARDS / _shard_name(batch_index),
        "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows),
    )


def prompts_sha256(prompt_ids: list[list[int]], label_ids: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for prompt, labels in zip(prompt_ids, label_ids):  # one prompt at a time: no giant string
        digest.update(json.dumps([prompt, labels], separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


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


# -- the dataset ------------------------------------------------------------------------------------
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
