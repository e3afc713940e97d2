"""Checkpoints that are whole or absent, and output folders that are never overwritten by accident.

transformers' Trainer writes ``checkpoint-<step>/`` file by file (weights, optimizer, scheduler,
RNG states, ``trainer_state.json`` last). A process killed in between leaves a folder that
``get_last_checkpoint`` picks, and the resume then fails (or silently restarts) on it.
:class:`~jacobi_engine.training.trainer.ConsistencyTrainer` therefore lets transformers write the
checkpoint into ``tmp-checkpoint-<step>/checkpoint-<step>/`` and, once every process is done, moves
it to ``checkpoint-<step>/`` in one rename (:func:`publish_checkpoint`). ``tmp-checkpoint-*``
matches neither ``get_last_checkpoint`` nor the ``save_total_limit`` rotation, so a kill at any
moment leaves only whole checkpoints where they look; a resume removes the leftovers
(:func:`remove_partial_checkpoints`).

:func:`check_out_dir` is the output-folder policy of ``train_consistency``: a non-empty folder is
refused unless the run continues it (``resume``) or replaces it (``overwrite``, which first
deletes the earlier run's checkpoints: :func:`remove_previous_run`), and the folder may be neither
the model it starts from nor inside it (nor hold it).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

STAGING_PREFIX = "tmp-"
# transformers writes the trainer state last: a checkpoint without it was cut short (by a version
# of this code that wrote checkpoints in place).
COMPLETE_MARKER = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is published: ``run_dir/tmp-checkpoint-<step>``."""
    return Path(run_dir) / f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-{step}"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move the complete checkpoint folder ``staged`` to ``final`` in one rename.

    Its files are flushed to disk first, so that the rename never publishes a folder whose data
    the OS still held in memory (a power cut would otherwise leave a whole-looking but empty one).
    An existing ``final`` (the same step saved by an earlier, interrupted run) is replaced.
    """
    for path in sorted(staged.rglob("*")):
        _fsync(path)
    _fsync(staged)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync(final.parent)


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete the ``tmp-checkpoint-*`` folders that runs killed while saving left in ``run_dir``."""
    run_dir = Path(run_dir)
    stale = sorted(path for path in run_dir.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir())
    for path in stale:
        warnings.warn(f"removing {path}: a checkpoint whose writing was interrupted", stacklevel=2)
        shutil.rmtree(path)
    return stale


def last_checkpoint(run_dir: str | Path) -> str | None:
    """The latest whole ``checkpoint-<step>`` folder in ``run_dir``, or None.

    Like ``transformers.trainer_utils.get_last_checkpoint``, but a folder without
    ``trainer_state.json`` (cut short by an older version that wrote checkpoints in place) is
    skipped, with a warning, instead of picked."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(int(match[1]), path) for path in run_dir.iterdir() if (match := _CHECKPOINT.match(path.name))]
    for _, path in sorted(found, reverse=True):
        if not path.is_dir():
            continue
        if (path / COMPLETE_MARKER).is_file():
            return str(path)
        warnings.warn(f"skipping {path}: it has no {COMPLETE_MARKER} (its writing was interrupted)", stacklevel=2)
    return None


def _nested(first: Path, second: Path) -> bool:
    return first == second or first in second.parents or second in first.parents


def check_out_dir(
    out_dir: str | Path, model_dir: str | Path, *, resume: bool, overwrite: bool, lora_init: str | Path | None = None
) -> None:
    """Refuse an output folder that training would lose data in (ValueError, before anything is written).

    * ``resume`` and ``overwrite`` together (continue the run in ``out_dir``, or replace it?);
    * ``out_dir`` a file;
    * ``out_dir`` the local ``model_dir``, inside it, or holding it (training would overwrite the model it
      starts from, or delete or rotate it with the checkpoints);
    * a non-empty ``out_dir`` without ``resume`` or ``overwrite``;
    * with ``overwrite``, a ``lora_init`` adapter inside ``out_dir`` (the overwrite may delete it).
    """
    for name, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if resume and overwrite:
        raise ValueError("resume continues the run saved in out_dir and overwrite replaces it: give one of them")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file, not a folder")
    model = Path(model_dir)
    if model.exists() and _nested(out.resolve(), model.resolve()):
        raise ValueError(
            f"out_dir {out} and the model folder {model} are the same folder or one holds the other: training "
            "would overwrite the model it starts from; choose an output folder outside the model's"
        )
    if out.is_dir() and not (resume or overwrite):
        entries = sorted(path.name for path in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(
                f"out_dir {out} is not empty (it holds {shown}): pass resume=True (--resume) to continue the run "
                "saved there, overwrite=True (--overwrite) to replace it, or choose a new output folder"
            )
    if overwrite and lora_init is not None and out.is_dir() and _nested(Path(lora_init).resolve(), out.resolve()):
        raise ValueError(
            f"lora_init {lora_init} is inside out_dir {out}, which overwrite replaces: copy the adapter elsewhere first"
        )


def remove_previous_run(out_dir: str | Path) -> list[Path]:
    """``overwrite``: delete the checkpoints (whole and partial) of the run saved in ``out_dir``, so that a
    later resume cannot continue it; the final model files are replaced when the new run saves its own."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    removed = [path for path in sorted(out.iterdir()) if path.is_dir() and _CHECKPOINT.match(path.name)]
    for path in removed:
        shutil.rmtree(path)
    return removed + remove_partial_checkpoints(out)
