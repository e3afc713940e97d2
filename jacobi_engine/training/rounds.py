"""On-policy rounds (progressive distillation): collect with the current model, train, repeat.

Round 0 collects Jacobi trajectories of the teacher and consistency-trains it; round r > 0
collects with round r-1's CLLM (its own trajectories: fewer, longer jumps than the teacher's)
and trains that CLLM further. Layout under ``out_dir``::

    round-0/data/   trajectories (collect_trajectories: resumable per batch)
    round-0/cllm/   checkpoints, then the trained model (train_consistency: resumable per checkpoint)
    round-0/done.json   written last, atomically: the round is complete (timings, sample count)
    round-1/...

Rerunning the same call after a kill skips finished rounds, resumes a collection from its
manifest and a training from its latest checkpoint, so no stage is redone beyond the last
batch or checkpoint. Returns the final model directory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DONE = "done.json"


def round_dir(out_dir: str | Path, round_index: int) -> Path:
    return Path(out_dir) / f"round-{round_index}"


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def run_rounds(
    teacher_dir: str | Path,
    out_dir: str | Path,
    rounds: int,
    prompts_for_round: Callable[[int], Sequence[str | dict]] | Sequence[str | dict],
    *,
    block_size: int,
    max_new_tokens: int,
    collect_batch_size: int = 32,
    eos_token_id=None,
    seed: int = 0,
    train_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run ``rounds`` collect-then-train rounds starting from ``teacher_dir``; see the module docstring.

    ``prompts_for_round``: the prompts of every round, or a function of the round index returning
    them (e.g. a fresh slice of a dataset per round). Round r collects with seed ``seed + r`` (new
    random initial guesses) and trains with ``train_consistency(..., seed=seed + r,
    **train_options)``. Returns ``out_dir/round-{rounds-1}/cllm``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jacobi_engine.training.collect import collect_trajectories
    from jacobi_engine.training.recipe import train_consistency

    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    train_options = dict(train_options or {})
    for reserved in ("resume", "seed"):
        if reserved in train_options:
            raise ValueError(f"train_options must not set {reserved!r}: run_rounds chooses it per round")
    model_dir = Path(teacher_dir)
    for round_index in range(rounds):
        here = round_dir(out_dir, round_index)
        cllm_dir = here / "cllm"
        if (here / DONE).exists():
            log(f"round {round_index}: done, skipped")
            model_dir = cllm_dir
            continue
        here.mkdir(parents=True, exist_ok=True)
        prompts = prompts_for_round(round_index) if callable(prompts_for_round) else prompts_for_round
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        dataset = collect_trajectories(
            model, tokenizer, list(prompts), here / "data", block_size=block_size, max_new_tokens=max_new_tokens,
            batch_size=collect_batch_size, eos_token_id=eos_token_id, seed=seed + round_index, progress=False,
        )  # fmt: skip
        collect_seconds = time.perf_counter() - started
        log(f"round {round_index}: {len(dataset)} chunk trajectories from {model_dir} in {collect_seconds:.0f} s")
        del model
        started = time.perf_counter()
        trainer = train_consistency(
            model_dir, here / "data", cllm_dir, resume=True, seed=seed + round_index, **train_options
        )
        train_seconds = time.perf_counter() - started
        if trainer.is_world_process_zero():
            _write_atomically(
                here / DONE,
                json.dumps(
                    {
                        "round": round_index,
                        "model": str(model_dir),
                        "chunk_trajectories": len(dataset),
                        "steps": trainer.state.global_step,
                        "collect_seconds_this_run": collect_seconds,
                        "train_seconds_this_run": train_seconds,
                    },
                    indent=2,
                )
                + "\n",
            )
        log(f"round {round_index}: trained {trainer.state.global_step} steps in {train_seconds:.0f} s -> {cllm_dir}")
        model_dir = cllm_dir
    return model_dir
