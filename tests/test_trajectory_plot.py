"""The trajectory picture: cell categories by hand, and the CLI end to end on a saved tiny model."""

from __future__ import annotations

import struct

import pytest
from models import tiny_model

from jacobi_engine import cli
from jacobi_engine.trajectory import BlockTrajectory
from jacobi_engine.trajectory_plot import ACCEPTED, STATIONARY, TRANSIENT, WRONG, classify, pick_block


def test_classify_by_hand():
    # Fixed point 10 11 12 13. Iteration 0 verifies 1 slot; slot 2 is right and stays right until
    # verified (stationary); slot 3 is right, then changes (transient). Iteration 1 verifies 2 slots.
    block = BlockTrajectory(
        start=0,
        states=[[10, 99, 12, 13], [10, 11, 12, 98], [10, 11, 12, 13]],
        fixed_point=[10, 11, 12, 13],
        n_accepted=[1, 2, 4],
    )
    assert classify(block) == [
        [ACCEPTED, WRONG, STATIONARY, TRANSIENT],
        [ACCEPTED, ACCEPTED, STATIONARY, WRONG],
        [ACCEPTED, ACCEPTED, ACCEPTED, ACCEPTED],
    ]


def test_pick_block():
    blocks = [BlockTrajectory(0, [[1]], [1], [1]), BlockTrajectory(1, [[2], [2]], [2], [0, 1])]
    assert pick_block(blocks, None)[0] == 1  # the one with the most iterations
    assert pick_block(blocks, -2)[0] == 0
    with pytest.raises(ValueError, match="--block"):
        pick_block(blocks, 5)


def test_trajectory_command_writes_a_png(tmp_path):
    from jacobi_engine.training import toy

    tokenizer = toy.train_tokenizer(128)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "trajectory.png"
    code = cli.main(
        [
            "trajectory",
            "--model",
            str(tmp_path / "model"),
            "--prompt",
            "def main():",
            "--out",
            str(out),
            "--block-size",
            "6",
            "--max-new-tokens",
            "24",
        ]
    )
    assert code == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 150
