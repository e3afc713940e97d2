"""The per-process side of tests/test_distributed.py, run under ``torchrun --nproc_per_node 2``.

    distributed_worker.py tp OUT_DIR MODEL_DIR...        tensor-parallel Jacobi decoding
    distributed_worker.py cli OUT_DIR -- CLI_ARGS...      ``jacobi-engine CLI_ARGS`` with recording hooks

Each rank writes what it saw to ``OUT_DIR/rank-<r>.json``; the test compares it with a single
process. The hooks only observe (which batches a rank decoded, which steps it trained) or, when
asked through ``JE_TEST_DIE_AT``, raise to emulate a process killed mid-run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # two processes share the CI machine's two cores

RANK = int(os.environ.get("RANK", "0"))  # set by torchrun; 0 when the test imports the constants
# Shared by the test and this worker: ragged, left-padded prompts (rows of 12, 7 and 2 tokens).
PROMPT_SEED, PROMPT_WIDTH, PADS = 1, 12, (0, 5, 10)
TP_CASES = [
    {"block_size": 4, "mode": "sliding", "init": "random_prompt"},
    {"block_size": 4, "mode": "chunked", "init": "random_prompt"},
    {"block_size": 7, "mode": "sliding", "init": "ngram"},
    {"block_size": 7, "mode": "chunked", "init": "ngram"},
    # Multi-candidate verification: the token tree's attention and the KV-row move on sharded heads.
    {"block_size": 6, "mode": "sliding", "init": "ngram", "candidates": 3, "candidate_len": 4},
    {"block_size": 6, "mode": "chunked", "init": "random_prompt", "candidates": 2, "candidate_len": 3},
    # The defaults: "auto" is a per-rank choice, so under tensor parallelism they are a fixed 16-slot block.
    {},
]
TP_NEW_TOKENS = 24


def tp_prompts(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    input_ids = torch.randint(3, vocab_size, (len(PADS), PROMPT_WIDTH), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, pad in enumerate(PADS):
        input_ids[row, :pad] = 0
        mask[row, :pad] = 0
    return input_ids, mask


def _write(out_dir: Path, record: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank-{RANK}.json").write_text(json.dumps(record))


def run_tp(out_dir: Path, model_dirs: list[str]) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from jacobi_engine import JacobiEngine

    record = {}
    for model_dir in model_dirs:
        model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto").eval()
        input_ids, mask = tp_prompts(model.config.vocab_size)
        q_proj = model.model.layers[0].self_attn.q_proj.weight
        outputs = []
        for case in TP_CASES:
            engine = JacobiEngine(model, **case)
            out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=TP_NEW_TOKENS, eos_token_id=[])
            keys, _ = next(iter(engine.cached_states())).state.cache.layer(0)
            outputs.append(
                {
                    "sequences": out.sequences.tolist(),
                    "cache_kv_heads": keys.shape[2],
                    "forwards": out.stats.forward_passes,
                    "block_size": engine.config.block_size,
                }
            )
        try:
            JacobiEngine(model, block_size="auto")
            refused = None
        except ValueError as error:
            refused = str(error)
        record[model_dir] = {
            "world_size": dist.get_world_size(),
            "q_proj_local_rows": q_proj.to_local().shape[0] if hasattr(q_proj, "to_local") else q_proj.shape[0],
            "cases": outputs,
            "auto_refused": refused,
        }
    _write(out_dir, record)


class _Killed(Exception):
    pass


def run_cli(out_dir: Path, argv: list[str]) -> None:
    import transformers

    from jacobi_engine import cli
    from jacobi_engine.training import collect, recipe

    die_at = int(os.environ.get("JE_TEST_DIE_AT", "0"))  # kill this process at its n-th batch/step
    die_rank = int(os.environ.get("JE_TEST_DIE_RANK", "-1"))  # -1: every rank
    record = {"batches": [], "steps": []}

    def dying(count: int) -> None:
        _write(out_dir, record)  # what this rank did before it "was killed" survives
        if die_at and count == die_at and die_rank in (-1, RANK):
            raise _Killed(f"rank {RANK} killed at {count}")

    generate = collect.JacobiEngine.generate

    def recording_generate(engine, *args, **kwargs):
        record["batches"].append(engine.seed)  # collect seeds batch k with seed + k (seed 0 here)
        output = generate(engine, *args, **kwargs)
        dying(len(record["batches"]))
        return output

    class Recorder(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            record["steps"].append(state.global_step)
            dying(len(record["steps"]))

    train_consistency = recipe.train_consistency

    def recording_train(*args, **kwargs):
        result = train_consistency(*args, **kwargs, callbacks=[Recorder()])
        record["fsdp"] = bool(result.is_fsdp_enabled)
        record["model_class"] = type(result.model_wrapped).__name__
        return result

    collect.JacobiEngine.generate = recording_generate
    recipe.train_consistency = recording_train  # commands.py imports it when the command runs
    code = cli.main(argv)
    _write(out_dir, record)
    if code:
        raise SystemExit(code)


def main() -> None:
    kind, out_dir = sys.argv[1], Path(sys.argv[2])
    if kind == "tp":
        run_tp(out_dir, sys.argv[3:])
    elif kind == "cli":
        run_cli(out_dir, sys.argv[sys.argv.index("--") + 1 :])
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
