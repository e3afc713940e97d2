"""Copy a trained teacher/CLLM pair into the package, where ``jacobi-engine demo`` finds it.

    python python/examples/ship_reference_pair.py --teacher runs/teacher --cllm runs/cllm_a/cllm
    python python/examples/ship_reference_pair.py --pair code --teacher runs/v2/code/teacher --cllm runs/v2/code/cllm/cllm

Copies each model's config, generation config, safetensors weights and tokenizer (nothing else:
no checkpoints, no optimizer state) to jacobi_engine/assets/cllm-{pair}/{teacher,cllm}/, with the
weights re-stored in ``--save-dtype`` when given (the v2 pairs: bfloat16), refuses weights over 10 MB, and writes the first held-out examples: demo_questions.jsonl
(``{"question", "answer"}``, GSM8K) or demo_prompts.jsonl (``{"prompt", "answer"}``, code).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS_ROOT = REPO / "jacobi_engine" / "assets"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
MAX_BYTES = 10 * 1000 * 1000


def stored_as(source: Path, dtype: str | None, scratch: Path) -> Path:
    """``source`` itself, or (``dtype`` given) a copy of it with its weights stored in that dtype."""
    if dtype is None:
        return source
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=getattr(torch, dtype))
    model.save_pretrained(str(scratch), safe_serialization=True)
    for name in FILES:
        if not (scratch / name).exists():
            shutil.copyfile(source / name, scratch / name)
    return scratch


def ship(source: Path, target: Path, dtype: str | None = None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        _ship(source, stored_as(source, dtype, Path(scratch)), target)


def _ship(provenance_source: Path, source: Path, target: Path) -> None:
    for name in FILES:
        path = source / name
        if not path.exists():
            raise SystemExit(f"{path} is missing")
        if name == "model.safetensors" and path.stat().st_size > MAX_BYTES:
            raise SystemExit(f"{path} is {path.stat().st_size} bytes, over the 10 MB limit")
        shutil.copyfile(path, target / name)
    metrics = provenance_source / "metrics.json"
    if metrics.exists():  # provenance: the command and numbers that produced these weights
        data = json.loads(metrics.read_text())
        summary = {key: data[key] for key in ("command", "timings", "dev_check", "eval") if key in data}
        if "train" in data:
            summary["train_seconds"] = data["train"].get("seconds")
        (target / "provenance.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("gsm8k", "code"), default="gsm8k")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--cllm", required=True)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument(
        "--save-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="store the weights in this dtype (default: as trained; the engine loads them in float32 on CPU)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from jacobi_engine.gsm8k import load_jsonl_gz, repo_data_path

    assets = ASSETS_ROOT / f"cllm-{args.pair}"
    ship(Path(args.teacher), assets / "teacher", args.save_dtype)
    ship(Path(args.cllm), assets / "cllm", args.save_dtype)
    cllm_metrics = Path(args.cllm).parent / "metrics.json"
    if cllm_metrics.exists():
        shutil.copyfile(cllm_metrics, assets / "cllm" / "provenance.json")
    if args.pair == "gsm8k":
        questions = load_jsonl_gz(repo_data_path("eval"))[: args.questions]
        with open(assets / "demo_questions.jsonl", "w") as handle:
            for record in questions:
                handle.write(json.dumps({"question": record["question"], "answer": record["answer"]}) + "\n")
    else:
        examples = load_jsonl_gz(REPO / "data" / "code" / "eval.jsonl.gz")[: args.questions]
        with open(assets / "demo_prompts.jsonl", "w") as handle:
            for record in examples:
                handle.write(json.dumps({"prompt": record["prompt"], "answer": record["answer"]}) + "\n")
    print(f"shipped to {assets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
