"""verify_and_commit: the compiled op (C++ on CPU, CUDA on GPU) and the torch reference against a
plain-Python model of the semantics, on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jacobi_engine import ops

POISON = -7


def target_of(tensors: dict, limits, chunked: bool) -> ops.CommitTarget:
    """The CommitTarget of the test's tensors (named after the Python model's lists)."""
    return ops.CommitTarget(
        tokens=tensors["out_tokens"],
        lengths=tensors["n_generated"],
        done=tensors["done"],
        eos_ids=tensors["eos_ids"],
        limits=limits,
        cache_seqlens=tensors["cache_seqlens"],
        chunked=chunked,
    )


def op_args(tensors: dict, limits: torch.Tensor, chunked: bool) -> tuple:
    """torch.ops.jacobi_engine.verify_and_commit's arguments, in its schema order."""
    return (tensors["scores"], tensors["block"], tensors["fill"], *target_of(tensors, limits, chunked).op_args())


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
        target_of(tensors, case["max_new_tokens"], case["chunked"]),
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
        args = op_args(tensors, torch.full((tensors["block"].shape[0],), 8, dtype=torch.int32), False)
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
        return torch.ops.jacobi_engine.verify_and_commit(*op_args(t, torch.full((1,), 8, dtype=torch.int32), False))

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
    ("out too short", dict(out_tokens=torch.zeros(2, 3, dtype=torch.long)), ValueError, "tokens"),
    ("n_generated dtype", dict(n_generated=torch.zeros(2, dtype=torch.long)), TypeError, "lengths"),
    ("done dtype", dict(done=torch.zeros(2, dtype=torch.int32)), TypeError, "done"),
    ("eos dtype", dict(eos_ids=torch.zeros(1, dtype=torch.int32)), TypeError, "eos_ids"),
]


@pytest.mark.parametrize(
    "limits, error",
    [(torch.full((2,), 8, dtype=torch.long), TypeError), (torch.full((3,), 8, dtype=torch.int32), ValueError)],
    ids=["dtype", "shape"],
)
def test_bad_max_new_tokens_tensor(limits, error):
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
    with pytest.raises(error, match="limits"):
        ops.verify_and_commit(
            tensors["scores"], tensors["block"], tensors["fill"], target_of(tensors, limits, False), backend="native"
        )


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
    scores, block, fill = tensors["scores"], tensors["block"], tensors["fill"]
    with pytest.raises(error, match=message):
        ops.verify_and_commit(scores, block, fill, target_of(tensors, 8, False), backend="native")
    if name != "out too short":  # only the int form of max_new_tokens can be checked without a sync
        with pytest.raises(error, match=message):
            limits = torch.full((2,), 8, dtype=torch.int32)
            ops.verify_and_commit(scores, block, fill, target_of(tensors, limits, False), backend="native")
    with pytest.raises(ValueError, match="backend"):
        limits = torch.full((2,), 8, dtype=torch.int32)
        ops.verify_and_commit(scores, block, fill, target_of(tensors, limits, False), backend="cuda")


# -- realistic vocabularies: NaN, exact ties, infinities and misaligned rows ---------------------
#
# The expected argmax comes from how the logits are built (the planted winner) and is checked by
# contract_argmax, a statement of torch.argmax's order that does not call argmax: the first NaN
# wins, otherwise the lowest index holding the maximum. The op's outputs start poisoned.

REALISTIC_VOCABS = (32000, 128256)
DEVICE_PARAMS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ROW_KINDS = ("plain", "tie", "edge_tie", "nan", "nan_last", "inf_tie", "all_neg_inf", "all_nan", "all_equal")
LAYOUTS = ("contiguous", "row_offset", "batch_stride", "slot_stride")


def contract_argmax(logits: torch.Tensor) -> list[int]:
    """torch.argmax's order over the last dim, stated without argmax: first NaN, else first maximum."""
    rows = logits.reshape(-1, logits.shape[-1]).float().cpu()
    winners = []
    for row in rows:
        nan_at = torch.isnan(row).nonzero()
        if len(nan_at):
            winners.append(int(nan_at[0]))
        else:
            winners.append(int((row == row.max()).nonzero()[0]))
    return winners


def plant_row(row: torch.Tensor, kind: str, generator: torch.Generator) -> int:
    """Writes a winner of the given kind into ``row`` (base values lie in [-10, 10)); returns its index."""
    vocab = row.shape[0]

    def index(low: int, high: int) -> int:
        return int(torch.randint(low, high, (), generator=generator))

    # Winners near the ends and around 16-byte vector boundaries, where a vectorised scan splits.
    winner = [index(0, vocab), vocab - 1, vocab - 2, 7, 8, 9, index(vocab - 20, vocab)][index(0, 7)]
    if kind == "plain":
        row[winner] = 20.0
    elif kind == "tie":
        winner = index(0, vocab - 1)
        row[winner] = 20.0
        row[torch.randint(winner + 1, vocab, (4,), generator=generator)] = 20.0
        row[vocab - 1] = 20.0
    elif kind == "edge_tie":
        winner = 0
        row[0] = row[vocab - 1] = 20.0
    elif kind == "nan":
        winner = index(1, vocab)
        row[index(0, winner)] = 20.0  # a larger finite value before the NaN does not win
        row[winner] = float("nan")
        if winner + 1 < vocab:
            row[torch.randint(winner, vocab, (3,), generator=generator)] = float("nan")
    elif kind == "nan_last":
        winner = vocab - 1
        row[0] = float("inf")
        row[winner] = float("nan")
    elif kind == "inf_tie":
        winner = index(0, vocab - 1)
        row[winner] = float("inf")
        row[torch.randint(winner + 1, vocab, (2,), generator=generator)] = float("inf")
    elif kind == "all_neg_inf":
        winner = 0
        row.fill_(float("-inf"))
    elif kind == "all_nan":
        winner = 0
        row.fill_(float("nan"))
    elif kind == "all_equal":
        winner = 0
        row.fill_(-3.0)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return winner


def realistic_logits(batch, n, vocab, dtype, layout, device, seed):
    """Logits [B, n, V] in the given memory layout, and the planted argmax [B, n] (list of lists)."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.rand((batch, n, vocab), generator=generator) * 20 - 10).to(dtype)
    preds = [[0] * n for _ in range(batch)]
    for b in range(batch):
        for j in range(n):
            kind = ROW_KINDS[(b * n + j + seed) % len(ROW_KINDS)]
            preds[b][j] = plant_row(values[b, j], kind, generator)
    if layout == "contiguous":
        logits = values.to(device)
    elif layout == "row_offset":
        # Every row starts one element past an odd-length stride: no row is 16-byte aligned.
        buffer = torch.zeros((batch, n, vocab + 3), dtype=dtype)
        buffer[..., 1 : vocab + 1] = values
        logits = buffer.to(device)[..., 1 : vocab + 1]
        assert logits.data_ptr() % 16 != 0
    elif layout == "batch_stride":
        buffer = torch.zeros((2 * batch + 1, n, vocab), dtype=dtype)
        buffer[1::2] = values
        logits = buffer.to(device)[1::2]
    else:  # slot_stride: a slice of a longer block, as when logits are cut out of a prefill
        buffer = torch.zeros((batch, n + 2, vocab), dtype=dtype)
        buffer[:, 1 : n + 1] = values
        logits = buffer.to(device)[:, 1 : n + 1]
    assert logits.stride(-1) == 1
    if layout != "contiguous":
        assert not logits.is_contiguous()
    assert contract_argmax(logits) == [p for row in preds for p in row], "test construction is wrong"
    return logits, preds


def realistic_case(preds, vocab, seed):
    """Block, fill and row state around the planted predictions (guesses agree for a random prefix)."""
    generator = torch.Generator().manual_seed(seed + 1)
    batch, n = len(preds), len(preds[0])

    def token() -> int:
        return int(torch.randint(0, vocab, (), generator=generator))

    max_new_tokens = 3 * n
    block = []
    for row in preds:
        agree = int(torch.randint(0, n, (), generator=generator))
        block.append([token()] + [row[j - 1] if j <= agree else token() for j in range(1, n)])
    return dict(
        preds=preds,
        block=block,
        fill=[[token() for _ in range(n)] for _ in range(batch)],
        n_generated=[int(torch.randint(0, max_new_tokens, (), generator=generator)) for _ in range(batch)],
        done=[b == batch - 1 and seed % 2 == 0 for b in range(batch)],
        seqlens=[int(torch.randint(0, 4000, (), generator=generator)) for _ in range(batch)],
        eos=[preds[0][n // 2], vocab - 1],  # one EOS inside a block, and the top id of the vocabulary
        chunked=seed % 3 == 0,
        max_new_tokens=max_new_tokens,
    )


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", REALISTIC_VOCABS)
def test_realistic_vocab_nan_ties_misaligned(vocab, dtype, layout, backend, device):
    batch, n = 3, 5
    seed = vocab + LAYOUTS.index(layout) * 7 + (dtype.itemsize * 3)
    logits, preds = realistic_logits(batch, n, vocab, dtype, layout, device, seed)
    case = realistic_case(preds, vocab, seed)
    long = dict(dtype=torch.long, device=device)
    width = case["max_new_tokens"] + n
    out = torch.full((batch, width + 1), POISON, **long)[:, 1:]
    block = torch.tensor(case["block"], **long)
    seqlens = torch.tensor(case["seqlens"], dtype=torch.int32, device=device)
    n_generated = torch.tensor(case["n_generated"], dtype=torch.int32, device=device)
    done = torch.tensor(case["done"], dtype=torch.bool, device=device)
    before = logits.clone()
    target = ops.CommitTarget(
        out, n_generated, done, torch.tensor(case["eos"], **long), case["max_new_tokens"], seqlens, case["chunked"]
    )
    accepted = ops.verify_and_commit(logits, block, torch.tensor(case["fill"], **long), target, backend=backend)
    expected = dict(
        block=[list(r) for r in case["block"]],
        seqlens=list(case["seqlens"]),
        out=[[POISON] * width for _ in range(batch)],
        n_generated=list(case["n_generated"]),
        done=list(case["done"]),
    )
    expected_accepted = python_verify(
        preds,
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
    assert accepted.tolist() == expected_accepted
    assert block.tolist() == expected["block"]
    assert seqlens.tolist() == expected["seqlens"]
    assert out.tolist() == expected["out"]
    assert n_generated.tolist() == expected["n_generated"]
    assert done.tolist() == expected["done"]
    assert torch.equal(logits.isnan(), before.isnan()) and torch.equal(logits.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_realistic_vocab_argmax_only(dtype, device):
    """Every planted row kind at V=128256 through the op's argmax alone: with a block whose
    guesses are exactly the predictions, all n slots verify and the committed tokens are the argmax."""
    batch, n, vocab = 2, len(ROW_KINDS), 128256
    logits, preds = realistic_logits(batch, n, vocab, dtype, "row_offset", device, seed=3)
    long = dict(dtype=torch.long, device=device)
    block = torch.tensor([[0] + row[:-1] for row in preds], **long)
    out = torch.full((batch, 2 * n + 1), POISON, **long)[:, 1:]
    n_generated = torch.zeros(batch, dtype=torch.int32, device=device)
    target = ops.CommitTarget(
        out,
        n_generated,
        torch.zeros(batch, dtype=torch.bool, device=device),
        torch.zeros(0, **long),
        2 * n,
        torch.zeros(batch, dtype=torch.int32, device=device),
        False,
    )
    accepted = ops.verify_and_commit(logits, block, torch.zeros((batch, n), **long), target)
    assert accepted.tolist() == [n] * batch
    assert out[:, :n].tolist() == preds
    assert out[:, n:].tolist() == [[POISON] * n] * batch
