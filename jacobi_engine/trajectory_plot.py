"""``jacobi-engine trajectory``: draw one real Jacobi trajectory (iterations down, positions across).

Each cell is the token guessed at that position in that iteration, coloured by what happened to it:
accepted (verified by this iteration's forward), stationary (already equal to its final token and
kept until verified, while an earlier slot was still wrong), correct but later changed, or wrong.
"""

from __future__ import annotations

import argparse

from jacobi_engine.trajectory import BlockTrajectory

ACCEPTED, STATIONARY, TRANSIENT, WRONG = "accepted", "stationary", "correct, later changed", "wrong"
COLOURS = {ACCEPTED: "#4caf50", STATIONARY: "#2196f3", TRANSIENT: "#ffe082", WRONG: "#ef9a9a"}


def classify(block: BlockTrajectory) -> list[list[str]]:
    """Category of every (iteration, slot) cell of one block's trajectory."""
    n_rows = len(block.states)
    final = block.fixed_point
    cells = [[WRONG] * len(state) for state in block.states]
    for slot in range(len(block.states[0])):
        if slot >= len(final):
            continue
        for row in range(n_rows):
            if slot < block.n_accepted[row]:
                cells[row][slot] = ACCEPTED
                continue
            if block.states[row][slot] != final[slot]:
                continue
            # Correct here: stationary if it stays correct in every later state until verified.
            stays = True
            for later in range(row + 1, n_rows):
                if slot < block.n_accepted[later]:
                    break
                if block.states[later][slot] != final[slot]:
                    stays = False
                    break
            cells[row][slot] = STATIONARY if stays else TRANSIENT
    return cells


def pick_block(blocks: list[BlockTrajectory], index: int | None) -> tuple[int, BlockTrajectory]:
    """The requested block, or by default the one that took the most iterations (the most telling)."""
    if not blocks:
        raise ValueError("the trajectory has no blocks (was anything generated?)")
    if index is not None:
        if not -len(blocks) <= index < len(blocks):
            raise ValueError(f"--block {index} out of range: the trajectory has {len(blocks)} blocks")
        return index % len(blocks), blocks[index]
    best = max(range(len(blocks)), key=lambda i: (len(blocks[i].states), -i))
    return best, blocks[best]


def draw(block: BlockTrajectory, labels: list[list[str]], out_path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cells = classify(block)
    n_rows, n_cols = len(block.states), len(block.states[0])
    figure, axes = plt.subplots(figsize=(max(6, 0.9 * n_cols + 1), max(2.5, 0.45 * n_rows + 1.5)))
    for row in range(n_rows):
        for col in range(n_cols):
            axes.add_patch(plt.Rectangle((col, row), 1, 1, facecolor=COLOURS[cells[row][col]], edgecolor="white"))
            axes.text(col + 0.5, row + 0.5, labels[row][col], ha="center", va="center", fontsize=7, family="monospace")
    axes.set_xlim(0, n_cols)
    axes.set_ylim(n_rows, 0)
    axes.set_xticks([c + 0.5 for c in range(n_cols)], [str(block.start + c) for c in range(n_cols)], fontsize=7)
    axes.set_yticks([r + 0.5 for r in range(n_rows)], [str(r) for r in range(n_rows)], fontsize=7)
    axes.set_xlabel("position in the generated text")
    axes.set_ylabel("Jacobi iteration")
    axes.set_title(title, fontsize=9)
    axes.legend(
        handles=[Patch(facecolor=COLOURS[k], label=k) for k in COLOURS],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18),
        ncol=4,
        fontsize=7,
        frameon=False,
    )
    figure.tight_layout()
    figure.savefig(out_path, dpi=150)
    plt.close(figure)


def _token_labels(tokenizer, states: list[list[int]]) -> list[list[str]]:
    if tokenizer is None:
        return [[str(t) for t in state] for state in states]
    labels = []
    for state in states:
        row = []
        for token in state:
            # Make whitespace visible: a space-only token would otherwise be an empty cell.
            text = tokenizer.decode([token]).replace(" ", "\u2423").replace("\n", "\\n")
            row.append(text if len(text) <= 6 else text[:5] + "…")
        labels.append(row)
    return labels


def run(args: argparse.Namespace) -> int:

    from jacobi_engine import JacobiEngine, models

    model, tokenizer = models.load(args.model)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    engine = JacobiEngine(model, block_size=args.block_size, mode="chunked", init=args.init, seed=args.seed)
    out = engine.generate(input_ids, max_new_tokens=args.max_new_tokens, record_trajectory=True)
    blocks = out.trajectories[0].blocks()
    index, block = pick_block(blocks, args.block)
    title = (
        f"block {index} (positions {block.start}..{block.start + len(block.states[0]) - 1}): "
        f"{len(block.states)} iterations to the fixed point, n={args.block_size}"
    )
    draw(block, _token_labels(tokenizer, block.states), args.out, title)
    print(f"iterations per block: {[len(b.states) for b in blocks]}")
    print(f"{title}\nwrote {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("trajectory", help="draw one Jacobi trajectory of a local model as a PNG")
    parser.add_argument(
        "--model", required=True, help="a named model (jacobi_engine.models), a local model folder or a hub id"
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block", type=int, help="which block to draw (default: the one with the most iterations)")
    parser.add_argument("--init", choices=["random_prompt", "ngram"], default="random_prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=run)
