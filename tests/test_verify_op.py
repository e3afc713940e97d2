"""verify_and_commit: the compiled op (C++ on CPU, CUDA on GPU) and the torch reference against a
plain-Python model of the semantics, on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jacobi_engine import ops

POISON = -7


def python_verify(preds, block, fill, seqlens, out, n_generated, done, eos, max_new_tokens, chunked):
    """Plain-Python statement of the contract, on lists. Mutates its list arguments."""
    accepted_all = []
    for b in range(len(block)):
        n = len(block[b])
        if done[b]:
            accepted_all.append(0)
            continue
        accepted = 1
        while accepted < n and block[b][accepted] == preds[b][accepted - 1]:
            accepted += 1
        verified = preds[b][:accepted]
        emitted = []
        finished = False
        for token in verified:
            if n_generated[b] + len(emitted) >= max_new_tokens:
                break
            emitted.append(token)
            if token in eos:
                break
        finished = (emitted and emitted[-1] in eos) or n_generated[b] + len(emitted) >= max_new_tokens
        if not chunked or accepted == n or finished:
            for j, token in enumerate(emitted):
                out[b][n_generated[b] + j] = token
            n_generated[b] += len(emitted)
            seqlens[b] += len(emitted) if finished else accepted
            done[b] = bool(finished)
            block[b] = preds[b][accepted - 1 :] + fill[b][n - accepted + 1 :]
        else:
            block[b] = block[b][:1] + preds[b][: n - 1]
        accepted_all.append(accepted)
    return accepted_all


@st.composite
def verify_cases(draw):
    batch = draw(st.integers(1, 5))
    n = draw(st.integers(1, 9))
    vocab = draw(st.integers(2, 12))  # small vocabularies: many matches, EOS hits and argmax ties
    max_new_tokens = draw(st.integers(1, 30))
    tokens = st.integers(0, vocab - 1)
    preds = [[draw(tokens) for _ in range(n)] for _ in range(batch)]
    block = []
    for row in preds:
        # Guesses that agree with the predictions for a random prefix, then anything.
        agree = draw(st.integers(0, n - 1))
        block.append([draw(tokens)] + [row[j - 1] if j <= agree else draw(tokens) for j in range(1, n)])
    fill = [[draw(tokens) for _ in range(n)] for _ in range(batch)]
    n_generated = [draw(st.integers(0, max_new_tokens - 1)) for _ in range(batch)]
    done = [draw(st.booleans()) and draw(st.booleans()) for _ in range(batch)]
    seqlens = [draw(st.integers(0, 50)) for _ in range(batch)]
    eos = draw(st.lists(tokens, max_size=2, unique=True))
    chunked = draw(st.booleans())
    score_kind = draw(st.sampled_from(["argmax", "float32", "float16", "bfloat16"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        preds=preds,
        block=block,
        fill=fill,
        n_generated=n_generated,
        done=done,
        seqlens=seqlens,
        eos=eos,
        chunked=chunked,
        max_new_tokens=max_new_tokens,
        vocab=vocab,
        score_kind=score_kind,
        seed=seed,
    )


def logits_with_argmax(preds: torch.Tensor, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random logits whose torch.argmax is ``preds``, with exact ties below the winner and some to its right."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randint(-4, 3, (*preds.shape, vocab), generator=generator).to(dtype)
    logits.scatter_(-1, preds[..., None], 3.0)
    # A tie to the right of the winner: argmax must keep the lower index.
    right = (preds + 1).clamp(max=vocab - 1)
    tie = torch.rand(preds.shape, generator=generator) < 0.5
    logits.scatter_(-1, right[..., None], torch.where(tie, 3.0, -5.0)[..., None].to(dtype))
    logits.scatter_(-1, preds[..., None], 3.0)
    assert torch.equal(logits.argmax(-1), preds)
    return logits


def tensors_for(case, device):
    long = dict(dtype=torch.long, device=device)
    preds = torch.tensor(case["preds"], **long)
    if case["score_kind"] == "argmax":
        scores = preds.clone()
    else:
        dtype = getattr(torch, case["score_kind"])
        scores = logits_with_argmax(preds.cpu(), case["vocab"], dtype, case["seed"]).to(device)
    width = case["max_new_tokens"] + 3
    out = torch.full((len(case["preds"]), width + 2), POISON, **long)[:, 2:]  # strided view, like the engine's
    return dict(
        scores=scores,
        block=torch.tensor(case["block"], **long),
        fill=torch.tensor(case["fill"], **long),
        cache_seqlens=torch.tensor(case["seqlens"], dtype=torch.int32, device=device),
        out_tokens=out,
        n_generated=torch.tensor(case["n_generated"], dtype=torch.int32, device=device),
        done=torch.tensor(case["done"], dtype=torch.bool, device=device),
        eos_ids=torch.tensor(case["eos"], **long),
    )


def check_against_python(case, backend, device):
    tensors = tensors_for(case, device)
    expected_out = [[POISON] * tensors["out_tokens"].shape[1] for _ in case["preds"]]
    expected = dict(
        block=[list(r) for r in case["block"]],
        seqlens=list(case["seqlens"]),
        out=expected_out,
        n_generated=list(case["n_generated"]),
        done=list(case["done"]),
    )
    accepted = python_verify(
        case["preds"],
        expected["block"],
        case["fill"],
        expected["seqlens"],
        expected["out"],
        expected["n_generated"],
        expected["done"],
        case["eos"],
        case["max_new_tokens"],
        case["chunked"],
    )
    result = ops.verify_and_commit(
        tensors["scores"],
        tensors["block"],
        tensors["fill"],
        tensors["cache_seqlens"],
        tensors["out_tokens"],
        tensors["n_generated"],
        tensors["done"],
        tensors["eos_ids"],
        case["max_new_tokens"],
        case["chunked"],
        backend=backend,
    )
    assert result.dtype == torch.int32
    assert result.tolist() == accepted
    assert tensors["block"].tolist() == expected["block"]
    assert tensors["cache_seqlens"].tolist() == expected["seqlens"]
    assert tensors["out_tokens"].tolist() == expected["out"]
    assert tensors["n_generated"].tolist() == expected["n_generated"]
    assert tensors["done"].tolist() == expected["done"]


@pytest.mark.parametrize("backend", ["native", "torch"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=verify_cases())
def test_matches_python_semantics(backend, device, case):
    check_against_python(case, backend, device)


def test_opcheck():
    case = dict(
        preds=[[1, 2, 3, 4], [4, 3, 2, 1]],
        block=[[0, 1, 2, 0], [5, 4, 3, 2]],
        fill=[[7] * 4, [8] * 4],
        n_generated=[0, 3],
        done=[False, False],
        seqlens=[5, 9],
        eos=[3],
        chunked=False,
        max_new_tokens=8,
        vocab=6,
        score_kind="float32",
        seed=0,
    )
    for kind in ("float32", "argmax"):
        tensors = tensors_for({**case, "score_kind": kind}, "cpu")
        args = (*tensors.values(), torch.full((tensors["block"].shape[0],), 8, dtype=torch.int32), False)
        torch.library.opcheck(torch.ops.jacobi_engine.verify_and_commit.default, args)


def test_compiles_with_torch_compile():
    case = dict(
        preds=[[1, 2, 3, 4]],
        block=[[0, 1, 2, 0]],
        fill=[[7] * 4],
        n_generated=[0],
        done=[False],
        seqlens=[5],
        eos=[],
        chunked=False,
        max_new_tokens=8,
        vocab=6,
        score_kind="float32",
        seed=0,
    )
    eager, compiled = tensors_for(case, "cpu"), tensors_for(case, "cpu")

    def step(t):
        return torch.ops.jacobi_engine.verify_and_commit(*t.values(), torch.full((1,), 8, dtype=torch.int32), False)

    expected = step(eager)
    result = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled)
    assert torch.equal(expected, result)
    for name in eager:
        assert torch.equal(eager[name], compiled[name]), name


BAD = [
    ("block dtype", dict(block=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "block"),
    ("block rank", dict(block=torch.zeros(8, dtype=torch.long)), ValueError, "block"),
    ("scores shape", dict(scores=torch.zeros(2, 3, 6)), ValueError, "scores"),
    ("scores dtype", dict(scores=torch.zeros(2, 4, dtype=torch.int32)), TypeError, "scores"),
    ("fill shape", dict(fill=torch.zeros(2, 3, dtype=torch.long)), ValueError, "fill"),
    ("seqlens dtype", dict(cache_seqlens=torch.zeros(2, dtype=torch.long)), TypeError, "cache_seqlens"),
    ("out too short", dict(out_tokens=torch.zeros(2, 3, dtype=torch.long)), ValueError, "out_tokens"),
    ("n_generated dtype", dict(n_generated=torch.zeros(2, dtype=torch.long)), TypeError, "n_generated"),
    ("done dtype", dict(done=torch.zeros(2, dtype=torch.int32)), TypeError, "done"),
    ("eos dtype", dict(eos_ids=torch.zeros(1, dtype=torch.int32)), TypeError, "eos_ids"),
]


@pytest.mark.parametrize(
    "limits, error",
    [(torch.full((2,), 8, dtype=torch.long), TypeError), (torch.full((3,), 8, dtype=torch.int32), ValueError)],
    ids=["dtype", "shape"],
)
def test_bad_max_new_tokens_tensor(limits, error):
    tensors = (
        torch.zeros(2, 4, 6),
        torch.zeros(2, 4, dtype=torch.long),
        torch.zeros(2, 4, dtype=torch.long),
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(2, 8, dtype=torch.long),
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(2, dtype=torch.bool),
        torch.zeros(1, dtype=torch.long),
    )
    with pytest.raises(error, match="max_new_tokens"):
        ops.verify_and_commit(*tensors, limits, False, backend="native")


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_arguments(case):
    name, override, error, message = case
    tensors = dict(
        scores=torch.zeros(2, 4, 6),
        block=torch.zeros(2, 4, dtype=torch.long),
        fill=torch.zeros(2, 4, dtype=torch.long),
        cache_seqlens=torch.zeros(2, dtype=torch.int32),
        out_tokens=torch.zeros(2, 8, dtype=torch.long),
        n_generated=torch.zeros(2, dtype=torch.int32),
        done=torch.zeros(2, dtype=torch.bool),
        eos_ids=torch.zeros(1, dtype=torch.long),
    )
    tensors.update(override)
    with pytest.raises(error, match=message):
        ops.verify_and_commit(*tensors.values(), 8, False, backend="native")
    if name != "out too short":  # only the int form of max_new_tokens can be checked without a sync
        with pytest.raises(error, match=message):
            ops.verify_and_commit(*tensors.values(), torch.full((2,), 8, dtype=torch.int32), False, backend="native")
    with pytest.raises(ValueError, match="backend"):
        ops.verify_and_commit(*tensors.values(), 8, False, backend="cuda")
