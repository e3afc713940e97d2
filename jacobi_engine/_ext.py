"""The compiled extension ``jacobi_engine._C``, loaded in one place with a helpful error.

Both the package ``__init__`` and :mod:`jacobi_engine.ops` import it from here, so the ops never
depend on the order in which the package ``__init__`` imports things (the dependency goes one way:
``__init__`` -> ``ops`` -> ``_ext`` -> ``_C``). Importing it registers ``torch.ops.jacobi_engine.*``.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which the extension links against)

try:
    from jacobi_engine import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "jacobi_engine._C (the compiled extension) is missing or does not match your torch. "
        "Build it from the checkout with `pip install --no-build-isolation -e .`"
    ) from error

CONSTANTS: dict = dict(_C.constants())
_BUILD_INFO: dict = dict(_C.build_info())


def build_info() -> dict:
    """What was compiled into the extension (``cuda_kernels``, ``cuda_arch``, ``cpu_kernels``).

    The one lookup of it: :func:`jacobi_engine.ops.resolve_verify_backend` and the package's
    ``build_info()`` read it here (tests monkeypatch this function to simulate other builds)."""
    return dict(_BUILD_INFO)
