"""The decode step (HF model forward + verify/commit + guesses) is capturable in a CUDA graph.

A CUDA graph cannot contain a host synchronisation or an op whose output shape depends on data.
We cannot capture a graph without a GPU, but we can watch every aten op the step dispatches on
CPU and fail on the ones that would sync or produce data-dependent shapes on a GPU. (``tolist()``
bypasses the dispatcher, so the step code itself must not use it.) The GPU
check (python/benchmarks/gpu_check.sh) then captures the real graph and compares its tokens.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from jacobi_engine import JacobiEngine

# Ops that read a device value on the host or size their output from data.
FORBIDDEN = {
    "item",  # .item(), int(t), float(t) (as dispatched under inference mode)
    "_local_scalar_dense",  # the same outside inference mode
    "index(bool mask)",  # boolean-mask indexing: a hidden nonzero
    "is_nonzero",
    "equal",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "bincount",
    "repeat_interleave",
    "allclose",
}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            indices = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                name = "index(bool mask)"
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


def record_decode_steps(engine: JacobiEngine, input_ids: torch.Tensor, **generate_kwargs) -> list[str]:
    recorder = OpRecorder()

    def watched(entry, run_step):
        with recorder:
            run_step()

    with engine.watch_steps(watched):
        engine.generate(input_ids, max_new_tokens=12, eos_token_id=[5], record_trajectory=True, **generate_kwargs)
    return recorder.ops


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2", "opt", "mistral_sliding", "gpt_neox"])
@pytest.mark.parametrize(
    "engine_kwargs",
    [
        dict(mode="sliding", init="random_prompt", verify_backend="native"),
        dict(mode="chunked", init="ngram", verify_backend="torch"),
        dict(mode="sliding", init="ngram", verify_backend="native", candidates=3, candidate_len=3),
        dict(mode="chunked", verify_backend="torch", candidates=2, candidate_len=2, repetition_penalty=1.2),
    ],
    ids=["sliding-native", "chunked-ngram-torch", "pool-sliding-native", "pool-chunked-processors-torch"],
)
def test_decode_step_has_no_sync_or_dynamic_shape(arch, engine_kwargs):
    model = tiny_model(arch)
    input_ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    generate_kwargs = {key: engine_kwargs.pop(key) for key in ("repetition_penalty",) if key in engine_kwargs}
    engine = JacobiEngine(model, block_size=4, **engine_kwargs)
    ops = record_decode_steps(engine, input_ids, **generate_kwargs)
    assert "verify_and_commit" in ops or "scatter_" in ops  # the recorder really saw the step
    bad = sorted(set(ops) & FORBIDDEN)
    assert not bad, f"decode step of {arch} calls graph-unsafe ops: {bad}"


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        dict(mode="sliding", init="ngram", verify_backend="native"),
        dict(mode="chunked", init="random_prompt", verify_backend="torch"),
        dict(mode="sliding", init="ngram", verify_backend="native", candidates=2, candidate_len=3),
        dict(mode="chunked", init="ngram", verify_backend="torch", candidates=2, candidate_len=2),
    ],
    ids=["sliding-ngram-native", "chunked-torch", "sliding-candidates-native", "chunked-candidates-torch"],
)
def test_sampling_step_has_no_sync_or_dynamic_shape(engine_kwargs):
    """The sampling step: processors, every warper, the sampling verify op (or its reference)."""
    model = tiny_model("llama")
    input_ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    engine = JacobiEngine(model, block_size=4, **engine_kwargs)
    settings = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    ops = record_decode_steps(engine, input_ids, **settings)
    # The recorder really saw the sampling step (the tree op when there are candidates).
    expected = "sample_tree_verify_and_commit" if engine_kwargs.get("candidates") else "sample_verify_and_commit"
    assert expected in ops or (engine_kwargs["verify_backend"] == "torch" and "cumsum" in ops)
    bad = sorted(set(ops) & FORBIDDEN)
    assert not bad, f"sampling decode step calls graph-unsafe ops: {bad}"


def test_recorder_catches_a_sync():
    """The check itself can fail: a step that calls .item() is reported."""
    model = tiny_model("llama")
    input_ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))

    class Syncing(JacobiEngine):
        extra = None

        def watch_steps(self, watcher):
            def with_extra(entry, run_step):
                def run():
                    run_step()
                    self.extra(entry)

                watcher(entry, run)

            return super().watch_steps(with_extra)

    engine = Syncing(model, block_size=4)
    engine.extra = lambda entry: int(entry.state.lengths.sum())
    assert set(record_decode_steps(engine, input_ids)) & FORBIDDEN == {"item"}

    def mask_done(entry):
        entry.state.block[entry.state.done] = 0

    engine.extra = mask_done
    assert set(record_decode_steps(engine, input_ids)) & FORBIDDEN == {"index(bool mask)"}
