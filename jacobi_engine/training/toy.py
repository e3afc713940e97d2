"""A tiny offline model, tokenizer and prompt set, for smoke tests and the walk-through in docs/training.md.

Nothing here is downloaded: the tokenizer is a small BPE trained with the ``tokenizers``
library on the Python standard library's own source, and the model is a randomly initialised
Llama built from a config.

    python -m jacobi_engine.training.toy OUT_DIR   # writes OUT_DIR/model and OUT_DIR/prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, as tests/models.py expects
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Modules that exist in every CPython since 3.8; their text is the corpus.
STDLIB_MODULES = ("textwrap.py", "string.py", "fnmatch.py", "glob.py", "shlex.py", "difflib.py", "argparse.py")


def stdlib_text() -> str:
    """Source text of a few standard-library modules (a few hundred kB, deterministic per Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / name).read_text(encoding="utf-8") for name in STDLIB_MODULES if (root / name).exists()]
    if not parts:
        raise FileNotFoundError(f"none of {STDLIB_MODULES} found under {root}")
    return "\n".join(parts)


def stdlib_prompts(count: int, min_chars: int = 30, max_chars: int = 70) -> list[str]:
    """``count`` distinct code lines of the standard library (comments skipped), in file order."""
    seen: set[str] = set()
    prompts: list[str] = []
    for line in stdlib_text().splitlines():
        line = line.strip()
        if min_chars <= len(line) <= max_chars and not line.startswith("#") and line not in seen:
            seen.add(line)
            prompts.append(line)
            if len(prompts) == count:
                return prompts
    raise ValueError(f"only {len(prompts)} lines of {min_chars}-{max_chars} characters available")


def train_tokenizer(vocab_size: int = 256, text: str | None = None):
    """A ``PreTrainedTokenizerFast`` (BPE, sentencepiece-style spaces) with ``<pad>``, ``<s>``,
    ``</s>``, ``<unk>`` as ids 0-3; it prepends ``<s>`` to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, limit_alphabet=64, show_progress=False
    )
    lines = (text if text is not None else stdlib_text()).splitlines()
    tokenizer.train_from_iterator(lines, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def toy_llama(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, init_range: float = 0.2):
    """A random tiny Llama. A wide init spreads its logits so greedy decoding has few near-ties."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_range,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def write_toy_setup(
    out_dir: str | Path, num_prompts: int = 8, repeats: int = 16, vocab_size: int = 256, seed: int = 0
) -> dict:
    """Save a toy model + tokenizer to ``out_dir/model`` and prompts to ``out_dir/prompts.jsonl``.

    Each of the ``num_prompts`` prompts is written ``repeats`` times: every copy is decoded
    from different random initial guesses, which a small prompt set needs to train on.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(vocab_size)
    model = toy_llama(len(tokenizer), seed=seed)
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts_path = out_dir / "prompts.jsonl"
    with prompts_path.open("w", encoding="utf-8") as handle:
        for _ in range(repeats):
            for prompt in stdlib_prompts(num_prompts):
                handle.write(json.dumps({"prompt": prompt}) + "\n")
    return {"model": str(model_dir), "prompts": str(prompts_path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=16, help="copies of each prompt (new random guesses each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(write_toy_setup(args.out_dir, args.num_prompts, args.repeats, seed=args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
