"""The engine on a GPU: Triton attention + CUDA verify op, eager and CUDA-graph, against HF greedy.

Skipped (not counted) on machines without CUDA; python/benchmarks/gpu_check.sh runs them.
"""

from __future__ import annotations

import pytest
import torch
from greedy_check import assert_matches_greedy, hf_greedy
from models import tiny_model

from jacobi_engine import JacobiEngine

pytestmark = pytest.mark.gpu
VOCAB = 96
PAD = 0


def ragged_prompts(device):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 12), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    return input_ids.to(device), mask.to(device)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2", "mistral_sliding"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("mode", ["sliding", "chunked"])
def test_cuda_engine_matches_hf(arch, cuda_graph, mode):
    model = tiny_model(arch, vocab_size=VOCAB).cuda()
    input_ids, mask = ragged_prompts("cuda")
    expected = hf_greedy(model, input_ids, mask, 40, eos_token_id=[7], pad_token_id=PAD)
    for block_size in (1, 4, 16):
        engine = JacobiEngine(model, block_size=block_size, mode=mode, cuda_graph=cuda_graph)
        out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[7], pad_token_id=PAD)
        assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)


def test_cuda_graph_equals_eager_bf16():
    """bf16 has no HF exactness guarantee (different kernels round differently), but the graph and
    eager paths run the very same kernels, so they must agree token for token."""
    model = tiny_model("llama", vocab_size=VOCAB, dtype=torch.bfloat16).cuda()
    input_ids, mask = ragged_prompts("cuda")
    outputs = [
        JacobiEngine(model, block_size=8, cuda_graph=graph, init="ngram").generate(
            input_ids, attention_mask=mask, max_new_tokens=64, eos_token_id=[]
        )
        for graph in (False, True)
    ]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[0].stats.accepted_histogram == outputs[1].stats.accepted_histogram


def test_cuda_graph_streams_and_records():
    model = tiny_model("llama", vocab_size=VOCAB).cuda()
    input_ids, _ = ragged_prompts("cuda")
    chunks = []

    class Collector:
        def put(self, value):
            chunks.append(value.reshape(-1).tolist())

        def end(self):
            pass

    out = JacobiEngine(model, block_size=4, cuda_graph=True, sync_every=3).generate(
        input_ids[:1], max_new_tokens=30, eos_token_id=[], streamer=Collector(), record_trajectory=True
    )
    streamed = [t for chunk in chunks[1:] for t in chunk]
    assert streamed == out.sequences[0, 12:].tolist()
    trajectory = out.trajectories[0]
    assert trajectory.tokens == streamed
    assert sum(step.n_accepted for step in trajectory.steps) >= 29


def test_cuda_graph_is_captured_once_per_key_and_reused():
    """A second call with the same (batch, capacity bucket, block, mode) key replays the graph
    captured by the first (no capture time), and every call stays exact."""
    model = tiny_model("llama", vocab_size=VOCAB).cuda()
    engine = JacobiEngine(model, block_size=4, cuda_graph=True)
    captures = []
    for seed, max_new in ((1, 40), (2, 33), (3, 47)):
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(3, VOCAB, (2, 10), generator=generator).cuda()
        expected = hf_greedy(model, input_ids, None, max_new, eos_token_id=[], pad_token_id=PAD)
        out = engine.generate(input_ids, max_new_tokens=max_new, eos_token_id=[])
        assert_matches_greedy(model, out.sequences, expected, input_ids, None, PAD)
        captures.append(out.stats.capture_seconds)
    assert captures[0] > 0 and captures[1:] == [0.0, 0.0]
    assert len(engine.cached_states()) == 1


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_cuda_engine_with_candidates_matches_hf(arch, cuda_graph):
    """The pool step on the GPU: Triton token-tree attention, the CUDA KV-row move, in a graph too."""
    model = tiny_model(arch, vocab_size=VOCAB).cuda()
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 15, (3, 14), generator=generator).cuda()  # repetitive: branches win
    expected = hf_greedy(model, input_ids, None, 48, eos_token_id=[7], pad_token_id=PAD)
    engine = JacobiEngine(model, block_size=8, candidates=4, candidate_len=4, init="ngram", cuda_graph=cuda_graph)
    out = engine.generate(input_ids, max_new_tokens=48, eos_token_id=[7])
    assert_matches_greedy(model, out.sequences, expected, input_ids, None, PAD)
    assert out.stats.candidate_wins > 0


# Two inductor compiles of a tiny Llama (the same graph: the second is a cache hit), within gpu_check's budget.
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["compiled", "compiled+graph"])
def test_compiled_cuda_engine_matches_hf_without_recompiles(cuda_graph, arch="llama"):
    """compile=True on CUDA (inductor + our Triton op, optionally inside our CUDA graph): exact against
    HF greedy, one graph for two calls sharing a key, no graph break."""
    from torch._dynamo.utils import counters

    model = tiny_model(arch, vocab_size=VOCAB).cuda()
    input_ids, mask = ragged_prompts("cuda")
    engine = JacobiEngine(model, block_size=4, compile=True, cuda_graph=cuda_graph)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for call, max_new in enumerate((40, 33)):
        expected = hf_greedy(model, input_ids, mask, max_new, eos_token_id=[7], pad_token_id=PAD)
        if call == 0:
            out = engine.generate(
                input_ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[7], pad_token_id=PAD
            )
            assert out.stats.compile_seconds > 0
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                out = engine.generate(
                    input_ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=[7], pad_token_id=PAD
                )
            assert out.stats.compile_seconds == 0
        assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)
    entry = next(iter(engine.cached_states()))
    assert entry.compiled is not None, entry.compile_failed
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert sum(counters["graph_break"].values()) == breaks


@pytest.mark.parametrize("candidates", [0, 3], ids=["block", "candidates"])
@pytest.mark.parametrize("mode", ["sliding", "chunked"])
def test_cuda_sampling_graph_equals_eager(candidates, mode):
    """do_sample=True on CUDA, with and without candidate branches: the captured graph replays the
    eager step token for token (counter-based numbers, no host state). This test makes no CPU
    comparison: a CPU forward rounds differently, so the engines' tokens may legitimately differ. The
    CUDA ops against the CPU ops bit for bit on the same distributions is the cuda instance of
    test_native_matches_reference_bit_for_bit in test_sampling_verify_op.py / test_sampling_tree_op.py,
    and python/benchmarks/gpu_checks.py at V=128,256."""
    model = tiny_model("llama", vocab_size=VOCAB).cuda()
    input_ids, mask = ragged_prompts("cuda")
    kwargs = dict(block_size=4, mode=mode, seed=77, init="ngram")
    if candidates:
        kwargs.update(candidates=candidates, candidate_len=3)
    settings = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=[7], pad_token_id=PAD, do_sample=True)
    eager = JacobiEngine(model, cuda_graph=False, **kwargs).generate(input_ids, temperature=0.8, **settings)
    graph = JacobiEngine(model, cuda_graph=True, **kwargs).generate(input_ids, temperature=0.8, **settings)
    assert torch.equal(eager.sequences, graph.sequences)
    assert eager.stats.accepted_histogram == graph.stats.accepted_histogram
