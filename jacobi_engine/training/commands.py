"""``jacobi-engine collect`` and ``jacobi-engine train``: consistency (CLLM) training from the shell.

    jacobi-engine collect --model DIR --prompts FILE.jsonl --out DATA --block-size 16 --max-new-tokens 256
    jacobi-engine train --model DIR --data DATA --out CLLM --loss global --ar-weight 10 --max-steps 1000 \
        --learning-rate 2e-5

Both resume when rerun with the same arguments (``train`` with ``--resume``). ``train`` refuses a
non-empty ``--out`` unless ``--resume`` or ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

# Fail at import (cli.py then offers the install hint) rather than halfway through a command.
for _package in ("datasets", "accelerate"):
    if importlib.util.find_spec(_package) is None:
        raise ImportError(f"{_package} is not installed (pip install 'jacobi-engine[train]')")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun / accelerate launch each process takes the GPU of its local rank.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device(name)


def _collect(args: argparse.Namespace) -> int:
    from jacobi_engine import models
    from jacobi_engine.training.collect import collect_trajectories, read_prompts
    from jacobi_engine.training.distributed import init_from_launcher, world

    # Launched as several processes: each decodes its share of the prompts (see collect.py).
    init_from_launcher()
    device = _resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    if args.no_eos:
        eos_token_id = []
    elif args.eos_token_id:
        eos_token_id = args.eos_token_id
    else:
        eos_token_id = None
    dataset = collect_trajectories(
        model,
        tokenizer,
        read_prompts(args.prompts),
        args.out,
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        eos_token_id=eos_token_id,
        augment=args.augment,
        augment_fraction=args.augment_fraction,
        max_repeat=args.max_repeat,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if world()[0] == 0:
        print(f"{len(dataset)} samples saved to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from jacobi_engine import models
    from jacobi_engine.training.recipe import train_consistency

    trainer = train_consistency(
        models.resolve(args.model),
        args.data,
        args.out,
        loss=args.loss,
        ar_weight=args.ar_weight,
        label_smoothing=args.label_smoothing,
        use_labels=args.use_labels,
        ar_data=args.ar_data,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr_scheduler=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        lora=args.lora,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        bf16=args.bf16,
        fsdp=args.fsdp,
        packing=args.packing,
        attention=args.attention,
        noise_schedule=args.noise_schedule,
    )
    if trainer.is_world_process_zero():
        print(f"trained {trainer.state.global_step} steps; model saved to {args.out}")
    return 0


def register(subparsers) -> None:
    """Add the ``collect`` and ``train`` subcommands to the ``jacobi-engine`` parser."""
    collect = subparsers.add_parser(
        "collect",
        help="collect Jacobi trajectories of a model on prompts (consistency-training data)",
        description="Decode prompts with the Jacobi engine (chunked mode) and save every chunk's "
        "trajectory as a Hugging Face dataset. Rerun the same command to resume after an interruption.",
    )
    collect.add_argument(
        "--model",
        required=True,
        help="model: a named model (jacobi_engine.models, e.g. smollm2-135m-instruct), a local folder "
        "(save_pretrained layout, with tokenizer) or a hub id",
    )
    collect.add_argument(
        "--prompts", required=True, help='JSONL file: {"prompt": ...} per line, optional "answer"/"label"'
    )
    collect.add_argument("--out", required=True, help="output directory (dataset + resume state)")
    collect.add_argument("--block-size", type=int, required=True, help="n, tokens per Jacobi chunk")
    collect.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate per prompt")
    collect.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    collect.add_argument(
        "--eos-token-id", type=int, action="append", help="stop token (repeatable); default: the model's"
    )
    collect.add_argument("--no-eos", action="store_true", help="never stop before --max-new-tokens")
    collect.add_argument(
        "--augment", action="store_true", help="CLLM augmentation: fix some wrong tokens of intermediate states"
    )
    collect.add_argument("--augment-fraction", type=float, default=0.5, help="share of wrong tokens to fix (0.5)")
    collect.add_argument(
        "--max-repeat", type=int, default=10, help="drop chunks whose output has this many equal tokens in a row"
    )
    collect.add_argument("--seed", type=int, default=0, help="seed of the random initial guesses")
    collect.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    collect.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: bfloat16 on GPU")
    collect.add_argument("--no-progress", action="store_true", help="no progress bar")
    collect.set_defaults(handler=_collect)

    train = subparsers.add_parser(
        "train",
        help="fine-tune a model into a CLLM on collected trajectories",
        description="Consistency training (CLLM): consistency loss + weighted AR loss, with the Hugging Face "
        "Trainer. Runs under torchrun / accelerate launch for data parallelism.",
    )
    train.add_argument("--model", required=True, help="model to start from: a named model, a local folder or a hub id")
    train.add_argument("--data", required=True, help="dataset directory written by `jacobi-engine collect`")
    train.add_argument("--out", required=True, help="output directory (checkpoints, then the final model)")
    train.add_argument("--loss", choices=("global", "local"), default="global", help="consistency loss (global)")
    train.add_argument("--ar-weight", type=float, default=10.0, help="weight w of the AR loss (10, as in CLLM)")
    train.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the AR loss")
    train.add_argument(
        "--use-labels", action="store_true", help="AR loss on the ground-truth answers instead of the model's own"
    )
    train.add_argument(
        "--ar-data",
        help='AR loss on examples drawn from this JSONL of {"prompt", "answer"} (e.g. the original fine-tuning '
        "data) instead of the chunks' own outputs",
    )
    train.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    train.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="default: by model size, log-linear from 1e-2 at 1e5 parameters to 2e-5 at 7e9 (1.7e-3 at 2.4M)",
    )
    train.add_argument("--batch-size", type=int, default=8, help="samples per device per step")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--lr-scheduler", default="cosine", help="any transformers scheduler name (cosine)")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--save-steps", type=int, default=500, help="checkpoint every this many steps")
    train.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run saved in a non-empty --out (its checkpoints are deleted first); without it or "
        "--resume a non-empty --out is refused",
    )
    train.add_argument("--lora", action="store_true", help="train LoRA adapters (peft), merged into the saved model")
    train.add_argument("--lora-r", type=int, default=16)
    train.add_argument("--lora-alpha", type=int, default=32)
    train.add_argument("--lora-dropout", type=float, default=0.0)
    train.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (autocast)")
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="shard weights, gradients and optimizer state across processes (FSDP2) instead of DDP",
    )
    train.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one row per prompt with all its chunks and a noise-aware mask (default); --batch-size then counts "
        "prompts. --no-packing: one row per (prompt, chunk) sample",
    )
    train.add_argument(
        "--attention",
        choices=("sdpa", "flex"),
        default="sdpa",
        help="packed mask via SDPA + boolean mask (default) or FlexAttention (GPU only for training)",
    )
    train.add_argument(
        "--noise-schedule",
        choices=("random", "progressive"),
        default="random",
        help="which trajectory state a sample trains on: uniform (random), or few wrong tokens to many over "
        "training (progressive)",
    )
    train.set_defaults(handler=_train)
