"""verify_backend resolution: "auto" never picks an op that was not compiled for the device.

An extension built with a CUDA torch but without nvcc has no CUDA kernels
(``build_info()['cuda_kernels']`` is False). These tests simulate that build, and the full one, by
monkeypatching the build-info lookup (jacobi_engine._ext.build_info); no GPU is needed, since the
resolution looks at the device type only.
"""

from __future__ import annotations

import pytest
import torch

from jacobi_engine import _ext, ops


@pytest.fixture(params=[False, True], ids=["no_cuda_kernels", "cuda_kernels"])
def cuda_kernels(request, monkeypatch):
    info = dict(_ext.build_info(), cuda_kernels=request.param)
    monkeypatch.setattr(_ext, "build_info", lambda: dict(info))
    return request.param


def test_auto_picks_what_was_compiled(cuda_kernels):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert ops.resolve_verify_backend("auto", cpu) == "native"
    assert ops.resolve_verify_backend("auto", cuda) == ("native" if cuda_kernels else "torch")
    assert ops.resolve_verify_backend("auto", "cuda", graph_safe=True) == ("native" if cuda_kernels else "torch")
    assert ops.resolve_verify_backend("torch", cuda) == "torch"
    assert ops.compiled_for(cuda) is cuda_kernels and ops.compiled_for("cpu") is True


def test_warning_only_where_auto_falls_back(cuda_kernels):
    assert ops.verify_backend_warning("cpu") is None
    message = ops.verify_backend_warning(torch.device("cuda"))
    if cuda_kernels:
        assert message is None
    else:
        assert "cuda_kernels" in message and "verify_backend='auto'" in message


def test_native_without_kernels_is_refused_clearly(cuda_kernels):
    if cuda_kernels:
        assert ops.resolve_verify_backend("native", "cuda") == "native"
        return
    with pytest.raises(ValueError, match="verify_backend='native'.*cuda_kernels"):
        ops.resolve_verify_backend("native", "cuda")
    with pytest.raises(ValueError, match="verify_backend"):
        ops.resolve_verify_backend("cuda", "cpu")


def test_other_device_types_have_no_compiled_ops(cuda_kernels):
    assert ops.resolve_verify_backend("auto", "meta") == "torch"
    assert ops.verify_backend_warning("meta") is not None


def test_the_wrappers_resolve_auto_themselves(monkeypatch):
    """The op wrappers resolve "auto" eagerly: with no compiled op for the device they run the torch
    reference, not the dispatcher's NotImplementedError. Simulated on CPU by reporting no CPU ops."""
    calls = []

    def no_compiled_ops(device):
        calls.append(torch.device(device).type)
        return False

    monkeypatch.setattr(ops, "compiled_for", no_compiled_ops)

    class Refusing:
        def __getattr__(self, name):
            raise AssertionError(f"the compiled op {name} was called")

    monkeypatch.setattr(torch.ops, "jacobi_engine", Refusing())
    scores = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    target = ops.CommitTarget(
        torch.zeros((1, 4), dtype=torch.long),
        torch.zeros(1, dtype=torch.int32),
        torch.zeros(1, dtype=torch.bool),
        torch.zeros(0, dtype=torch.long),
        4,
        torch.zeros(1, dtype=torch.int32),
        False,
    )
    accepted = ops.verify_and_commit(scores, torch.tensor([[0, 1]]), torch.zeros((1, 2), dtype=torch.long), target)
    assert accepted.tolist() == [2] and target.tokens[0, :2].tolist() == [1, 2]
    assert calls == ["cpu"]
