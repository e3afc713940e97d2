"""Trains a tiny CLLM with train_consistency and stops for good halfway through writing one checkpoint.

    python checkpoint_worker.py MODEL DATA OUT STEP READY_FILE OPTIONS_JSON

When the checkpoint of ``STEP`` has its weights, optimizer and scheduler on disk but not yet its
RNG and trainer state, the worker writes the folder being written to ``READY_FILE`` and sleeps, so
that tests/test_checkpoints.py can SIGKILL it at exactly that point.
"""

import json
import sys
import time
from pathlib import Path

import torch

from jacobi_engine.training.recipe import train_consistency
from jacobi_engine.training.trainer import ConsistencyTrainer


def main() -> None:
    model, data, out, step, ready_file, options = sys.argv[1:]
    torch.set_num_threads(1)
    save_optimizer_and_scheduler = ConsistencyTrainer._save_optimizer_and_scheduler

    def hang_after_optimizer(self, output_dir):
        save_optimizer_and_scheduler(self, output_dir)
        if self.state.global_step == int(step):
            Path(ready_file).write_text(str(output_dir))
            time.sleep(600)

    ConsistencyTrainer._save_optimizer_and_scheduler = hang_after_optimizer
    train_consistency(model, data, out, **json.loads(options))
    raise SystemExit(f"step {step} was never saved")


if __name__ == "__main__":
    main()
