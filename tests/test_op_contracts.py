"""Every torch.ops.jacobi_engine op under misuse: the values it indexes with (lengths and limits
against the token buffer, token ids against the vocabulary, rows against the cache) are checked.

The CPU ops read them on the host and raise a ValueError naming the argument before writing
anything; the torch references (and the CUDA kernels, which cannot read device values without a
host sync) clamp them and set a bit of the error word, which ops.raise_if_error turns into the same
ValueError. Nothing ever writes out of bounds. Expectations come from the contract stated here
(which rows stay untouched, what a clamped limit means), never from the op under test.
"""

from __future__ import annotations

import pytest
import torch

from jacobi_engine import ops, reference

BIG = 1 << 40
DEVICE_PARAMS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def verify_case(device="cpu", batch=3, n=4, width=12, vocab=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    long = dict(dtype=torch.long, device=device)
    logits = torch.randn((batch, n, vocab), generator=generator).to(device)
    preds = logits.argmax(-1)
    block = torch.cat([torch.zeros((batch, 1), **long), preds[:, :-1]], dim=1)  # every guess right
    return dict(
        scores=logits,
        block=block,
        fill=torch.full((batch, n), 5, **long),
        tokens=torch.full((batch, width), -7, **long),
        lengths=torch.tensor([2, 3, 4][:batch], dtype=torch.int32, device=device),
        done=torch.zeros(batch, dtype=torch.bool, device=device),
        eos_ids=torch.tensor([-1], **long),
        limits=torch.full((batch,), width - 2, dtype=torch.int32, device=device),
        cache_seqlens=torch.tensor([10, 11, 12][:batch], dtype=torch.int32, device=device),
    )


def target_of(case, chunked=False):
    names = ("tokens", "lengths", "done", "eos_ids", "limits", "cache_seqlens")
    return ops.CommitTarget(*(case[name] for name in names), chunked)


def snapshot(case):
    return {name: value.clone() for name, value in case.items() if isinstance(value, torch.Tensor)}


def assert_unchanged(case, before, names):
    for name in names:
        assert torch.equal(case[name], before[name]), name


BAD_COMMIT_VALUES = [
    ("limits", "limits", 13),  # one past the buffer
    ("limits", "limits", 1 << 30),
    ("limits", "limits", -1),
    ("lengths", "lengths", -1),
    ("lengths", "lengths", -(1 << 30)),
    ("lengths", "lengths", 11),  # past its limit (10), inside the buffer
    ("lengths", "lengths", (1 << 31) - 1),
]
STATE = ("block", "tokens", "lengths", "done", "cache_seqlens")


@pytest.mark.parametrize("field, name, value", BAD_COMMIT_VALUES, ids=[f"{f}={v}" for f, _, v in BAD_COMMIT_VALUES])
def test_verify_and_commit_refuses_bad_lengths_and_limits(field, name, value):
    case = verify_case()
    case[field][1] = value
    before = snapshot(case)
    with pytest.raises(ValueError, match=rf"{name}\[1\]"):
        ops.verify_and_commit(case["scores"], case["block"], case["fill"], target_of(case), backend="native")
    assert_unchanged(case, before, STATE)  # checked before anything is written
    # A direct torch.ops call: the same error, never a write past the buffer.
    with pytest.raises(ValueError, match=name):
        torch.ops.jacobi_engine.verify_and_commit(
            case["scores"], case["block"], case["fill"], *target_of(case).op_args()
        )
    assert_unchanged(case, before, STATE)


def test_finished_rows_are_not_checked():
    case = verify_case()
    case["done"][1] = True
    case["lengths"][1] = -5  # never read: the row is finished
    case["limits"][1] = 1 << 30
    accepted = ops.verify_and_commit(case["scores"], case["block"], case["fill"], target_of(case), backend="native")
    assert accepted.tolist()[1] == 0


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_device_side_clamping_and_error_word(backend, device):
    """What the CUDA kernels (and the torch reference, which does the same on any device) do with
    values they cannot check without a sync: a limit past the buffer is clamped to it (the row
    finishes at the buffer's end, as with limit = W), a bad length leaves its row as it is, and the
    bits name both. On CPU the native op raises instead (the test above)."""
    if backend == "native" and device == "cpu":
        pytest.skip("the CPU op raises (test_verify_and_commit_refuses_bad_lengths_and_limits)")
    case = verify_case(device)
    width = case["tokens"].shape[1]
    case["lengths"][0] = 9
    case["limits"][0] = 1 << 30  # 9 + 4 accepted > W = 12: without the clamp, writes past the buffer
    case["lengths"][2] = -3
    clamped = {name: value.clone() for name, value in case.items()}
    clamped["limits"][0] = width
    clamped["lengths"][2], clamped["done"][2] = 0, True  # the row that must stay untouched: not run
    before = snapshot(case)
    target = target_of(case)
    accepted = ops.verify_and_commit(case["scores"], case["block"], case["fill"], target, backend=backend)
    expected = reference.verify_and_commit(clamped["scores"], clamped["block"], clamped["fill"], target_of(clamped))
    assert accepted.tolist() == [expected.tolist()[0], expected.tolist()[1], 0]
    for name in STATE:
        assert torch.equal(case[name][:2], clamped[name][:2]), name
        assert torch.equal(case[name][2], before[name][2]), name
    assert case["tokens"][0, width - 3 :].tolist() == case["scores"][0].argmax(-1)[:3].tolist()
    word = int(target.errors[0])
    assert word == ops.ERROR_BITS["limits"] | ops.ERROR_BITS["lengths"]
    with pytest.raises(ValueError, match=r"limits\[b\].*lengths\[b\]"):
        ops.raise_if_error(target.errors)
    assert int(target.errors[0]) == 0  # reset: the next call starts clean
    ops.raise_if_error(target.errors)


def test_error_word_api():
    assert set(ops.ERROR_BITS) == {"limits", "lengths", "block", "candidates", "src/dst"}
    assert len(set(ops.ERROR_BITS.values())) == 5
    assert ops.error_messages(0) == []
    lines = ops.error_messages(ops.ERROR_BITS["block"] | ops.ERROR_BITS["src/dst"] | (1 << 20))
    assert lines[0].startswith("block:") and lines[1].startswith("src/dst:") and "unknown" in lines[2]
    errors = ops.new_error_word("cpu")
    ops.check_error_word(0, errors)
    errors.fill_(ops.ERROR_BITS["candidates"])
    with pytest.raises(ValueError, match="candidates"):
        ops.check_error_word(int(errors[0]), errors)
    assert int(errors[0]) == 0
    errors.fill_(ops.ERROR_BITS["lengths"])
    with pytest.raises(ValueError, match="lengths"):
        ops.raise_if_error(errors, reset=False)
    assert int(errors[0]) == ops.ERROR_BITS["lengths"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_logits_dtypes_are_the_same_on_every_device(dtype):
    """fp64 logits are taken (the CUDA op compiles a double argmax for them, with the same dtype
    check, csrc/ops.cpp check_logits_dtype); the result is the argmax's, as the reference says."""
    case = verify_case()
    case["scores"] = case["scores"].to(dtype)
    expected_case = {name: value.clone() for name, value in case.items()}
    accepted = ops.verify_and_commit(case["scores"], case["block"], case["fill"], target_of(case), backend="native")
    argmax = expected_case["scores"].argmax(-1)
    expected = reference.verify_and_commit(
        argmax, expected_case["block"], expected_case["fill"], target_of(expected_case)
    )
    assert torch.equal(accepted, expected)
    for name in STATE:
        assert torch.equal(case[name], expected_case[name]), name


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.uint8], ids=str)
def test_other_score_dtypes_are_refused(dtype):
    case = verify_case()
    case["scores"] = case["scores"].to(dtype) if dtype.is_complex else case["scores"].argmax(-1).to(dtype)
    with pytest.raises(TypeError, match="scores"):
        ops.verify_and_commit(case["scores"], case["block"], case["fill"], target_of(case), backend="native")


# -- sampling ops: token ids against the vocabulary ------------------------------------------------
def sampling_case(device="cpu", batch=2, n=4, vocab=7, seed=1, candidates=0, g=2):
    generator = torch.Generator().manual_seed(seed)
    long = dict(dtype=torch.long, device=device)
    nodes = n + candidates * g
    width = max(n, g + 1) if candidates else n
    case = dict(
        probs=torch.rand((batch, nodes, vocab), generator=generator).softmax(-1).to(device),
        block=torch.randint(0, vocab, (batch, n), generator=generator).to(device),
        fill=torch.randint(0, vocab, (batch, width), generator=generator).to(device),
        proposal=torch.rand((batch, n, vocab), generator=generator).softmax(-1).to(device),
        draft_sampled=torch.ones((batch, n), dtype=torch.bool, device=device),
        n_fixed=torch.zeros(batch, dtype=torch.int32, device=device),
        seed=torch.tensor([3], **long),
        sequence_ids=torch.arange(batch, device=device),
        step=torch.tensor([0], **long),
        tokens=torch.full((batch, 16), -7, **long),
        lengths=torch.full((batch,), 2, dtype=torch.int32, device=device),
        done=torch.zeros(batch, dtype=torch.bool, device=device),
        eos_ids=torch.tensor([-1], **long),
        limits=torch.full((batch,), 14, dtype=torch.int32, device=device),
        cache_seqlens=torch.full((batch,), 5, dtype=torch.int32, device=device),
    )
    if candidates:
        case["candidates"] = torch.randint(0, vocab, (batch, candidates, g), generator=generator).to(device)
        case["usable"] = torch.ones((batch, candidates), dtype=torch.bool, device=device)
        case["row"] = torch.full((batch, width), -5, **long)
    return case


def sampling_state(case):
    names = ("proposal", "draft_sampled", "n_fixed", "seed", "sequence_ids", "step")
    return ops.SamplingState(*(case[name] for name in names))


def run_sampling(case, backend, target=None):
    target = target or target_of(case)
    if "candidates" in case:
        tree = (case["probs"], case["block"], case["candidates"], case["usable"], case["row"], case["fill"])
        return ops.sample_tree_verify_and_commit(*tree, sampling_state(case), target, backend=backend)
    return ops.sample_verify_and_commit(
        case["probs"], case["block"], case["fill"], sampling_state(case), target, backend=backend
    )


SAMPLING_STATE = ("block", "proposal", "draft_sampled", "tokens", "lengths", "done", "cache_seqlens")
BAD_IDS = [7, 8, BIG, -1, -BIG]  # V = 7


@pytest.mark.parametrize("candidates", [0, 2], ids=["block_op", "tree_op"])
@pytest.mark.parametrize("token", BAD_IDS)
@pytest.mark.parametrize("rule", ["ratio", "fixed"])
def test_sampling_ops_refuse_draft_ids_outside_the_vocabulary(token, rule, candidates):
    case = sampling_case(candidates=candidates)
    case["block"][1, 2] = token
    if rule == "fixed":  # already verified in this chunk: a plain op would emit it without reading p
        case["n_fixed"][:] = 3
    before = snapshot(case)
    with pytest.raises(ValueError, match=r"block\[1, 2\]"):
        run_sampling(case, "native")
    assert_unchanged(case, before, SAMPLING_STATE)


@pytest.mark.parametrize("token", BAD_IDS)
def test_tree_op_refuses_usable_candidate_ids_outside_the_vocabulary(token):
    case = sampling_case(candidates=3)
    case["candidates"][0, 1, 1] = token
    before = snapshot(case)
    with pytest.raises(ValueError, match=r"candidates\[0, 1, 1\]"):
        run_sampling(case, "native")
    assert_unchanged(case, before, SAMPLING_STATE)
    case["usable"][0, 1] = False  # an unusable branch is never read: its ids do not matter
    run_sampling(case, "native")


@pytest.mark.parametrize("candidates", [0, 2], ids=["block_op", "tree_op"])
@pytest.mark.parametrize("field, value", [("limits", 17), ("lengths", -1), ("lengths", 15)])
def test_sampling_ops_refuse_bad_lengths_and_limits(candidates, field, value):
    case = sampling_case(candidates=candidates)
    case[field][0] = value
    before = snapshot(case)
    with pytest.raises(ValueError, match=rf"{field}\[0\]"):
        run_sampling(case, "native")
    assert_unchanged(case, before, SAMPLING_STATE)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("candidates", [0, 2], ids=["block_op", "tree_op"])
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_sampling_ops_flag_bad_ids_on_the_device(backend, candidates, device):
    """Where values cannot be read on the host (the CUDA ops, and the torch references that mirror
    them): a bad draft is rejected, never emitted; a bad candidate is never chosen; both are flagged."""
    if backend == "native" and device == "cpu":
        pytest.skip("the CPU ops raise (the tests above)")
    case = sampling_case(device, candidates=candidates, seed=4)
    vocab = case["probs"].shape[-1]
    case["block"][0, 1] = BIG
    case["n_fixed"][0] = 2  # the bad draft sits in the chunk's verified prefix
    if candidates:
        case["candidates"][1, 0, 0] = -BIG
    target = target_of(case)
    accepted, *winner = (lambda r: r if isinstance(r, tuple) else (r,))(run_sampling(case, backend, target))
    emitted = [case["tokens"][b, 2 : int(case["lengths"][b])] for b in range(2)]
    assert all(((row >= 0) & (row < vocab)).all() for row in emitted)
    assert int(accepted[0]) == 1  # the first draft is rejected whatever the rule
    if winner:
        assert int(winner[0][1]) != 0  # the bad branch never wins
    expected = ops.ERROR_BITS["block"] | (ops.ERROR_BITS["candidates"] if candidates else 0)
    assert int(target.errors[0]) == expected
    with pytest.raises(ValueError, match="block"):
        ops.raise_if_error(target.errors)


# -- move_cache_rows: rows against the cache --------------------------------------------------------
BAD_MOVES = [
    ("past the end", [8, 0], [1, 0], 5),
    ("dst past the end", [0, 0], [6, 0], 5),
    ("negative src", [-1, 0], [0, 0], 2),
    ("negative dst", [3, 0], [-2, 0], 2),
    ("huge src", [BIG, 0], [0, 0], 2),
    ("int64 overflow", [(1 << 63) - 1, 0], [0, 0], 2),
    ("forward overlap", [1, 0], [2, 0], 3),
    ("more rows than the cache", [0, 0], [0, 0], 11),
]


@pytest.mark.parametrize("case", BAD_MOVES, ids=[c[0] for c in BAD_MOVES])
def test_move_cache_rows_refuses_rows_outside_the_cache(case):
    _, src, dst, rows = case
    buffers = [torch.randn(2, 10, 1, 4), torch.randn(2, 10, 2, 3).half()]
    before = [b.clone() for b in buffers]
    src, dst = torch.tensor(src), torch.tensor(dst)
    with pytest.raises(ValueError, match="src"):
        ops.move_cache_rows(buffers, src, dst, rows, backend="native")
    errors = ops.new_error_word("cpu")
    with pytest.raises(ValueError, match="must lie in the cache"):
        torch.ops.jacobi_engine.move_cache_rows(buffers, src, dst, rows, errors)
    assert all(torch.equal(b, old) for b, old in zip(buffers, before))
    # The reference flags instead, and leaves the sequence as it is (the other one still moves).
    ops.move_cache_rows(buffers, src, dst, rows, errors, backend="torch")
    assert int(errors[0]) == ops.ERROR_BITS["src/dst"]
    assert all(torch.equal(b[0], old[0]) for b, old in zip(buffers, before))
    with pytest.raises(ValueError, match="src/dst"):
        ops.raise_if_error(errors)


@pytest.mark.gpu
def test_cuda_move_cache_rows_flags_rows_outside_the_cache():
    buffers = [torch.randn(2, 10, 1, 4, device="cuda")]
    before = buffers[0].clone()
    errors = ops.new_error_word("cuda")
    src, dst = torch.tensor([BIG, 6], device="cuda"), torch.tensor([0, 1], device="cuda")
    ops.move_cache_rows(buffers, src, dst, 3, errors)
    assert torch.equal(buffers[0][0], before[0])  # refused, untouched
    assert torch.equal(buffers[0][1, 1:4], before[1, 6:9])  # the good sequence moved
    with pytest.raises(ValueError, match="src/dst"):
        ops.raise_if_error(errors)
