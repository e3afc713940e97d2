"""Train a teacher from scratch: a byte-level BPE tokenizer and a small LlamaForCausalLM.

    nice -n 19 python python/examples/train_teacher.py --out runs/teacher                  # GSM8K
    nice -n 19 python python/examples/train_teacher.py --domain code --out runs/teacher-code

``--domain gsm8k`` (default): ``data/gsm8k``, prompt ``format_prompt(question)``, answer the reference
solution. ``--domain code``: ``data/code`` (python/examples/prepare_code.py: a standard-library
function's signature + docstring as the prompt, its body as the answer, whole modules held out);
examples longer than ``--max-positions`` are dropped; the held-out evaluation is the perplexity of
the bodies (there is no final answer to check).

Checkpoints: every ``--checkpoint-every`` steps the model, optimizer, step and curve go to
``OUT/checkpoint/`` (with the tokenizer, saved before the first step); rerunning the same command
continues from there, with the same batch schedule (it is a function of the seed), so a resumed
run ends with the weights of an uninterrupted one.

Everything is seeded. The defaults (2.45M fp32 parameters, 5 epochs = 8.4M tokens) fit 45 minutes on
2 dedicated CPU cores: one thread alone trains at about 3,700 tokens/s (38 minutes), two are faster.
On a loaded machine it simply takes longer; ``--train-minutes`` caps the wall time if you must.
Steps:
1. a byte-level BPE tokenizer (digits split one by one) trained on the train split only, saved as a
   ``PreTrainedTokenizerFast`` that adds ``<s>`` in front, pads on the left and ends answers with ``</s>``;
2. a ``LlamaForCausalLM`` trained on ``<s> format_prompt(q) answer </s>``. Prompt tokens are weighted
   ``--prompt-loss-weight`` in the loss: the model must read questions, not write them;
3. held-out evaluation on ``data/gsm8k/eval.jsonl.gz``: perplexity of the reference answers (answer
   tokens only, conditioned on the prompt, all 500 problems) and greedy final-answer accuracy
   (``model.generate(do_sample=False)``, left-padded batches) on the first ``--eval-generate`` problems;
4. ``save_pretrained`` of model (fp32 safetensors, at most 10 MB), tokenizer and generation config,
   plus ``metrics.json`` with these numbers, the training curve and the exact command.

Load the result with ``AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)`` and
``AutoTokenizer.from_pretrained(out)``. The prompt ids the model was trained on are exactly
``tokenizer(format_prompt(question))["input_ids"]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jacobi_engine.gsm8k import extract_final_answer, format_prompt, load_jsonl_gz, repo_data_path

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
MAX_MODEL_BYTES = 10_000_000
REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("gsm8k", "code")


def load_domain(domain: str, data_dir: Path | None) -> tuple[list[dict], list[dict], str]:
    """(train records, eval records, description of the split); every record has "prompt" and "answer"."""
    if domain == "gsm8k":

        def load(split):
            path = (data_dir / f"{split}.jsonl.gz") if data_dir else repo_data_path(split)
            return [dict(r, prompt=format_prompt(r["question"])) for r in load_jsonl_gz(path)]

        return load("train"), load("eval"), "data/gsm8k/eval.jsonl.gz (last 500 problems of GSM8K train, held out)"
    if domain == "code":
        root = data_dir or REPO / "data" / "code"
        split = json.loads((root / "split.json").read_text())
        described = f"{root}/eval.jsonl.gz: held-out stdlib modules {', '.join(split['eval_top_levels'])}"
        return load_jsonl_gz(root / "train.jsonl.gz"), load_jsonl_gz(root / "eval.jsonl.gz"), described
    raise ValueError(f"--domain must be one of {DOMAINS}, got {domain!r}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory (model, tokenizer, metrics.json)")
    parser.add_argument("--domain", choices=DOMAINS, default="gsm8k")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: data/gsm8k or data/code")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (resume)")
    parser.add_argument(
        "--save-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the saved weights (bfloat16: twice the parameters within 10 MB; trained in float32, "
        "evaluated in float32 from the rounded weights, as the engine runs them on CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    # Tokenizer and model.
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--num-heads", type=int, default=6)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=480)
    parser.add_argument("--max-positions", type=int, default=1024)
    # Optimisation.
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (calibration runs)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens per batch, padding included")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--prompt-loss-weight", type=float, default=0.1)
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="wall-clock cap on training (off by default, since it makes the result depend on machine load); "
        "an early stop is recorded in metrics.json",
    )
    parser.add_argument("--log-every", type=int, default=10)
    # Evaluation.
    parser.add_argument("--eval-generate", type=int, default=100, help="held-out problems for greedy accuracy")
    parser.add_argument("--eval-batch", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--skip-eval", action="store_true", help="no final evaluation (calibration runs)")
    return parser.parse_args()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE over ``texts``. Digits are pre-split one by one, so numbers are spelled
    digit by digit (easier arithmetic and copying, more tokens per answer for Jacobi to accept).
    Special ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2. Encoding adds ``<s>`` in front."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    return tokenizer


def encode_examples(tokenizer, records: list[dict]) -> list[tuple[list[int], int]]:
    """``(ids, n_prompt)`` per record: ids = ``<s>`` + prompt + answer + ``</s>``, where the prompt
    is encoded alone, exactly as it will be at inference, and n_prompt counts ``<s>`` + prompt."""
    prompts = tokenizer([r["prompt"] for r in records])["input_ids"]
    answers = tokenizer([r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    return [(p + a + [tokenizer.eos_token_id], len(p)) for p, a in zip(prompts, answers, strict=True)]


# ---------------------------------------------------------------------------------------------
# Batching


def plan_batches(lengths: list[int], batch_tokens: int, generator: random.Random) -> list[list[int]]:
    """One epoch: examples sorted by length (random order among equal lengths), packed greedily so
    that rows x longest row <= batch_tokens, then the batches shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], generator.random()))
    batches, current, longest = [], [], 0
    for index in order:
        longest_if_added = max(longest, lengths[index])
        if current and longest_if_added * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if_added = [], lengths[index]
        current.append(index)
        longest = longest_if_added
    if current:
        batches.append(current)
    generator.shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], int]], pad_id: int, prompt_weight: float):
    """Right-padded ``input_ids`` [B, T] long, per-target loss weights [B, T-1] float (prompt
    targets ``prompt_weight``, answer and ``</s>`` 1, padding 0) and an answer mask [B, T-1] bool."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    weights = torch.zeros(len(examples), width - 1)
    answer_mask = torch.zeros(len(examples), width - 1, dtype=torch.bool)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        # Target t+1 is predicted at position t: targets 1..n_prompt-1 are prompt tokens.
        weights[row, : n_prompt - 1] = prompt_weight
        weights[row, n_prompt - 1 : len(ids) - 1] = 1.0
        answer_mask[row, n_prompt - 1 : len(ids) - 1] = True
    return input_ids, weights, answer_mask


def token_losses(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every next token, [B, T-1] float32."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none").view(
        input_ids.shape[0], -1
    )


def lr_at(step: int, total_steps: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def answer_perplexity(model, tokenizer, records: list[dict], batch_tokens: int) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of the reference answer tokens (``</s>`` excluded), each
    conditioned on ``<s>`` + its prompt. Returns (perplexity, answer tokens scored)."""
    model.eval()
    examples = [(ids[:-1], n_prompt) for ids, n_prompt in encode_examples(tokenizer, records)]
    total_nll, total_tokens = 0.0, 0
    for batch in plan_batches([len(ids) for ids, _ in examples], batch_tokens, random.Random(0)):
        input_ids, _, answer_mask = collate([examples[i] for i in batch], tokenizer.pad_token_id, 0.0)
        losses = token_losses(model, input_ids)
        total_nll += losses[answer_mask].double().sum().item()
        total_tokens += int(answer_mask.sum())
    return math.exp(total_nll / total_tokens), total_tokens


@torch.no_grad()
def greedy_accuracy(model, tokenizer, records: list[dict], batch_size: int, max_new_tokens: int) -> dict:
    """Final-answer accuracy in points of greedy ``generate`` on left-padded batches."""
    model.eval()
    correct, hit_limit, generated_tokens, samples = 0, 0, 0, []
    started = time.perf_counter()
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        encoded = tokenizer([r["prompt"] for r in batch], padding=True, return_tensors="pt")
        output = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens)
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        for record, tokens in zip(batch, new_tokens, strict=True):
            finished = (tokens == tokenizer.eos_token_id).nonzero()
            length = int(finished[0]) + 1 if len(finished) else len(tokens)
            hit_limit += not len(finished)
            generated_tokens += length
            text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
            predicted, reference = extract_final_answer(text), extract_final_answer(record["answer"])
            correct += predicted is not None and predicted == reference
            if len(samples) < 3:
                samples.append({"question": record["question"], "generated": text, "reference": record["answer"]})
    seconds = time.perf_counter() - started
    return {
        "accuracy_points": 100.0 * correct / len(records),
        "correct": correct,
        "problems": len(records),
        "hit_max_new_tokens": hit_limit,
        "mean_generated_tokens": generated_tokens / len(records),
        "generate_seconds": seconds,
        "samples": samples,
    }


def save_state(checkpoint_dir: Path, state: dict) -> None:
    """Write the resume state (tensors, numbers, lists and dicts of them) to ``checkpoint_dir/state.pt``."""
    torch.save(state, checkpoint_dir / "state.pt.tmp")
    (checkpoint_dir / "state.pt.tmp").replace(checkpoint_dir / "state.pt")  # atomic: a kill keeps the last one


def load_state(checkpoint_dir: Path) -> dict:
    """Read ``checkpoint_dir/state.pt`` with ``weights_only=True``: the state holds only tensors and plain
    containers of numbers, so unpickling anything else (code a crafted file would run) is refused."""
    return torch.load(checkpoint_dir / "state.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", *sys.argv])
    log(f"command: {command}")
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")

    train_records, eval_records, eval_split = load_domain(args.domain, args.data_dir)
    train_texts = [r["prompt"] + r["answer"] for r in train_records]
    checkpoint_dir = args.out / "checkpoint"
    resume_state = None
    if (checkpoint_dir / "state.pt").exists():
        # The tokenizer is loaded, not retrained: the checkpoint's weights belong to its ids.
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint_dir))
        resume_state = load_state(checkpoint_dir)
        log(f"resuming from {checkpoint_dir} at step {resume_state['step']}")
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
        tokenizer.model_max_length = args.max_positions
        tokenizer.save_pretrained(str(checkpoint_dir))
    examples = encode_examples(tokenizer, train_records)
    if args.domain == "code":
        # A few stdlib functions are longer than the context; drop them rather than truncate code.
        keep = [index for index, (ids, _) in enumerate(examples) if len(ids) <= args.max_positions]
        if len(keep) < len(examples):
            log(f"dropped {len(examples) - len(keep)} examples longer than {args.max_positions} tokens")
        train_records = [train_records[i] for i in keep]
        train_texts = [train_texts[i] for i in keep]
        examples = [examples[i] for i in keep]
        eval_ids = encode_examples(tokenizer, eval_records)
        eval_records = [r for r, (ids, _) in zip(eval_records, eval_ids) if len(ids) <= args.max_positions]
    lengths = [len(ids) for ids, _ in examples]
    # The prompt is encoded on its own; say how often that differs from encoding the whole text.
    joint_mismatch = sum(
        tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] != ids
        for text, (ids, _) in zip(train_texts, examples, strict=True)
    )
    log(
        f"tokenizer: vocab {len(tokenizer)}, train {sum(lengths)} tokens in {len(examples)} examples "
        f"(mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}); "
        f"prompt/answer split differs from joint encoding in {joint_mismatch} examples"
    )
    if max(lengths) > args.max_positions:
        raise ValueError(f"longest example has {max(lengths)} tokens > --max-positions {args.max_positions}")

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.3f}M parameters, {config.to_diff_dict()}")
    bytes_per_parameter = 2 if args.save_dtype == "bfloat16" else 4
    if bytes_per_parameter * n_params > MAX_MODEL_BYTES:
        raise ValueError(f"{n_params} {args.save_dtype} parameters exceed the {MAX_MODEL_BYTES} byte budget")

    plan_generator = random.Random(args.seed)
    schedule: list[list[int]] = []
    epoch_starts = []
    while len(schedule) < 1 or len(epoch_starts) < math.ceil(args.epochs):
        epoch_starts.append(len(schedule))
        schedule.extend(plan_batches(lengths, args.batch_tokens, plan_generator))
    steps_per_epoch = len(schedule) / len(epoch_starts)
    total_steps = round(args.epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    log(
        f"schedule: {total_steps} steps ({args.epochs} epochs of ~{steps_per_epoch:.0f} batches "
        f"of <= {args.batch_tokens} tokens)"
    )

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    curve, window_tokens, window_answer_nll, window_answer_tokens, window_loss = [], 0, 0.0, 0, 0.0
    first_step, earlier_seconds, earlier_cpu_seconds = 0, 0.0, 0.0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["torch_rng"])
        curve, first_step = resume_state["curve"], resume_state["step"]
        earlier_seconds, earlier_cpu_seconds = resume_state["seconds"], resume_state["cpu_seconds"]
    train_started = time.perf_counter() - earlier_seconds
    train_cpu_started = time.process_time() - earlier_cpu_seconds
    window_started = time.perf_counter()
    stopped_early = False
    step = first_step - 1
    model.train()
    for step in range(first_step, total_steps):
        if args.train_minutes is not None and time.perf_counter() - train_started > 60 * args.train_minutes:
            stopped_early = True
            log(f"stopping early at step {step}/{total_steps}: --train-minutes {args.train_minutes} reached")
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, args)
        input_ids, weights, answer_mask = collate(
            [examples[i] for i in schedule[step]], tokenizer.pad_token_id, args.prompt_loss_weight
        )
        losses = token_losses(model, input_ids)
        loss = (losses * weights).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()

        window_loss += loss.item()
        window_answer_nll += losses.detach()[answer_mask].sum().item()
        window_answer_tokens += int(answer_mask.sum())
        window_tokens += sum(len(examples[i][0]) for i in schedule[step])
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            now = time.perf_counter()
            tokens_per_s = window_tokens / (now - window_started)
            elapsed = now - train_started
            # CPU seconds over threads: about the wall time on dedicated cores, whatever the machine load.
            dedicated = (time.process_time() - train_cpu_started) / args.threads
            eta = elapsed / (step + 1) * (total_steps - step - 1)
            point = {
                "step": step + 1,
                "epoch": round((step + 1) / steps_per_epoch, 3),
                "lr": optimizer.param_groups[0]["lr"],
                "loss": window_loss / ((step % args.log_every) + 1),
                "answer_loss": window_answer_nll / window_answer_tokens,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "elapsed_s": elapsed,
                "cpu_s_per_thread": dedicated,
            }
            curve.append(point)
            log(
                f"step {step + 1}/{total_steps} epoch {point['epoch']:.2f} lr {point['lr']:.2e} "
                f"loss {point['loss']:.4f} answer_loss {point['answer_loss']:.4f} grad_norm {point['grad_norm']:.2f} "
                f"{tokens_per_s:.0f} tok/s elapsed {elapsed / 60:.1f} min (cpu/thread {dedicated / 60:.1f}) "
                f"eta {eta / 60:.1f} min"
            )
            window_tokens, window_answer_nll, window_answer_tokens, window_loss = 0, 0.0, 0, 0.0
            window_started = now
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < total_steps:
            state = {
                "step": step + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "curve": curve,
                "seconds": time.perf_counter() - train_started,
                "cpu_seconds": time.process_time() - train_cpu_started,
            }
            save_state(checkpoint_dir, state)
            log(f"checkpoint at step {step + 1} in {checkpoint_dir}")
    steps_done = step + 1 if not stopped_early else step
    train_seconds = time.perf_counter() - train_started
    train_cpu_seconds = time.process_time() - train_cpu_started
    trained_tokens = sum(len(examples[i][0]) for batch in schedule[:steps_done] for i in batch)
    log(
        f"trained {steps_done} steps, {trained_tokens} tokens in {train_seconds / 60:.1f} min "
        f"({train_cpu_seconds / 60:.1f} CPU min over {args.threads} threads)"
    )

    model.eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
    )
    if args.save_dtype == "bfloat16":
        # Save bf16; evaluate the rounded weights in fp32, which is what users load and run on CPU.
        model = model.to(torch.bfloat16)
        model.save_pretrained(args.out)
        model = model.float()
    else:
        model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    model_bytes = (args.out / "model.safetensors").stat().st_size
    log(f"saved to {args.out}: model.safetensors {model_bytes / 1e6:.2f} MB")
    if model_bytes > MAX_MODEL_BYTES:
        raise RuntimeError(f"model.safetensors is {model_bytes} bytes > {MAX_MODEL_BYTES}")

    metrics = {
        "command": command,
        "seed": args.seed,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dtype": f"{args.save_dtype} stored, trained and evaluated in float32",
        "parameters": n_params,
        "model_safetensors_bytes": model_bytes,
        "vocab_size": len(tokenizer),
        "train": {
            "examples": len(examples),
            "tokens_per_epoch": sum(lengths),
            "steps": steps_done,
            "planned_steps": total_steps,
            "epochs": steps_done / steps_per_epoch,
            "tokens": trained_tokens,
            "seconds": train_seconds,
            "tokens_per_s": trained_tokens / train_seconds,
            "cpu_seconds": train_cpu_seconds,
            "tokens_per_cpu_s_per_thread": trained_tokens / (train_cpu_seconds / args.threads),
            "stopped_early": stopped_early,
            "final_answer_loss": curve[-1]["answer_loss"] if curve else None,
            "curve": curve,
        },
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    }
    if not args.skip_eval:
        perplexity, scored = answer_perplexity(model, tokenizer, eval_records, args.batch_tokens)
        log(f"held-out answer perplexity {perplexity:.4f} over {scored} answer tokens of {len(eval_records)} problems")
        metrics["eval"] = {
            "split": eval_split,
            "answer_perplexity": perplexity,
            "answer_tokens": scored,
            "perplexity_definition": "exp(mean NLL) of the reference answer tokens (</s> excluded), "
            "conditioned on <s> + prompt",
        }
        if args.domain == "gsm8k":
            accuracy = greedy_accuracy(
                model, tokenizer, eval_records[: args.eval_generate], args.eval_batch, args.max_new_tokens
            )
            log(
                f"held-out greedy accuracy {accuracy['accuracy_points']:.1f} points "
                f"({accuracy['correct']}/{accuracy['problems']}), "
                f"{accuracy['hit_max_new_tokens']} hit max_new_tokens, {accuracy['generate_seconds']:.0f} s"
            )
            for sample in accuracy["samples"][:1]:
                log(f"sample generation:\n{format_prompt(sample['question'])}{sample['generated']}")
            metrics["eval"]["greedy"] = {
                **accuracy,
                "first_n_problems": args.eval_generate,
                "max_new_tokens": args.max_new_tokens,
            }
    metrics["total_seconds"] = time.perf_counter() - started
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"done in {metrics['total_seconds'] / 60:.1f} min; metrics in {args.out / 'metrics.json'}")


if __name__ == "__main__":
    main()
