"""Proof that consistency training works, end to end through the two commands.

A tiny random Llama (toy BPE tokenizer trained on standard-library source) decodes 8 fixed
prompts with Jacobi iteration. We collect its trajectories on those prompts (each prompt 16
times, i.e. 16 random initial guesses per chunk), train it with the global consistency loss +
AR loss, and decode the same prompts again with initial guesses it never saw (other seeds).

Measured: ``JacobiStats.tokens_per_forward`` in **chunked** mode (the mode the trajectories
come from), block size 8, 32 new tokens, averaged over three guess seeds. Required: at least
1.5x the value before training, while greedy output stays nearly the same, where "nearly"
means >= 90% of the generated tokens equal, position by position, to the greedy output
before training (Hugging Face ``generate(do_sample=False)``, independent of our engine).
"""

import json

import pytest
import torch

from jacobi_engine import JacobiEngine, cli
from jacobi_engine.training import toy
from jacobi_engine.training.collect import left_pad

NUM_PROMPTS = 8
REPEATS = 16
BLOCK = 8
MAX_NEW = 32
EVAL_SEEDS = (1000, 1001, 1002)  # collection uses seeds 0..7 (one per batch of 16)
MIN_SPEEDUP = 1.5
MIN_AGREEMENT = 0.9


def tokens_per_forward(model, input_ids, attention_mask, mode="chunked"):
    values = []
    for seed in EVAL_SEEDS:
        engine = JacobiEngine(model, block_size=BLOCK, mode=mode, seed=seed)
        output = engine.generate(input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW, eos_token_id=[])
        values.append(output.stats.tokens_per_forward)
    return sum(values) / len(values)


def greedy_tokens(model, input_ids, attention_mask):
    model.generation_config.eos_token_id = None  # no EOS, like the engine runs with eos_token_id=[]
    with torch.no_grad():
        output = model.generate(
            input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0
        )
    return output[:, input_ids.shape[1] :]


def run_proof(root, seed=0, steps=800):
    """Collect, train, measure; returns the numbers (also used to check robustness over seeds)."""
    from transformers import AutoModelForCausalLM

    tokenizer = toy.train_tokenizer(256)
    model = toy.toy_llama(len(tokenizer), seed=seed)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = toy.stdlib_prompts(NUM_PROMPTS)
    with open(root / "prompts.jsonl", "w") as handle:
        for _ in range(REPEATS):
            for prompt in prompts:
                handle.write(json.dumps({"prompt": prompt}) + "\n")

    input_ids, attention_mask = left_pad([tokenizer(prompt)["input_ids"] for prompt in prompts])
    before = tokens_per_forward(model, input_ids, attention_mask)
    before_sliding = tokens_per_forward(model, input_ids, attention_mask, mode="sliding")
    greedy_before = greedy_tokens(model, input_ids, attention_mask)

    data, out = str(root / "data"), str(root / "cllm")
    collect = ["collect", "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"), "--out", data]
    collect += ["--block-size", str(BLOCK), "--max-new-tokens", str(MAX_NEW), "--no-eos", "--batch-size", "16"]
    assert cli.main(collect + ["--no-progress"]) == 0
    train = ["train", "--model", str(root / "model"), "--data", data, "--out", out, "--loss", "global"]
    train += ["--ar-weight", "10", "--max-steps", str(steps), "--learning-rate", "3e-3", "--lr-scheduler", "constant"]
    train += ["--batch-size", "8", "--save-steps", str(steps), "--logging-steps", "100", "--seed", str(seed)]
    assert cli.main(train) == 0

    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    after = tokens_per_forward(trained, input_ids, attention_mask)
    after_sliding = tokens_per_forward(trained, input_ids, attention_mask, mode="sliding")
    greedy_after = greedy_tokens(trained, input_ids, attention_mask)
    return {
        "tokens_per_forward_chunked": [round(before, 3), round(after, 3)],
        "tokens_per_forward_sliding": [round(before_sliding, 3), round(after_sliding, 3)],
        "speedup_chunked": round(after / before, 3),
        "greedy_agreement": (greedy_before == greedy_after).float().mean().item(),
    }


@pytest.mark.slow
def test_consistency_training_raises_acceptance_keeps_greedy_output(tmp_path):
    result = run_proof(tmp_path)  # one torch thread (conftest): fastest for tiny models
    print("CLLM proof:", json.dumps(result))
    before, after = result["tokens_per_forward_chunked"]
    assert after >= MIN_SPEEDUP * before, result
    assert result["greedy_agreement"] >= MIN_AGREEMENT, result
