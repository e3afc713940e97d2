"""The per-forward context: what one engine forward tells the attention dispatch and the cache.

A :class:`ForwardContext` belongs to one decode state: its cache, the resolved attention backend,
and per forward a host-side bound on the cache rows any row reads (``kv_len_bound``, eager mode
only) and the token-tree layout of the block (``tree_mask``/``tree_depth``, with candidates). The
model forward (:mod:`jacobi_engine.prefill`) sets those per forward; the attention function
(:mod:`jacobi_engine.attention`) and :meth:`JacobiCache.get_seq_length` read them. Nothing is written
onto the cache or the guess strategy from outside.

The context is installed for the current thread only (:func:`installed`), for the length of one
``generate`` call or scheduler step, so concurrent threads never see each other's.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

_local = threading.local()


@dataclass
class ForwardContext:
    cache: object  # the JacobiCache this state's forwards run on
    backend: str  # resolved attention backend: "triton" or "torch"
    kv_len_bound: int | None = None  # host-side bound on max(cache_seqlens) + tokens of this forward
    tree_mask: torch.Tensor | None = None  # bool [T, T]: the block + candidate branches, or None (causal)
    tree_depth: torch.Tensor | None = None  # int32 [T]

    def set_forward(self, kv_len_bound: int | None, tree) -> None:
        self.kv_len_bound = kv_len_bound
        self.tree_mask, self.tree_depth = tree if tree is not None else (None, None)

    def end_forward(self) -> None:
        self.kv_len_bound = None
        self.tree_mask = self.tree_depth = None


def current() -> ForwardContext | None:
    """The context installed in this thread, or None outside an engine forward."""
    return getattr(_local, "context", None)


@contextlib.contextmanager
def installed(context: ForwardContext):
    """Install ``context`` for this thread (nesting restores the outer one)."""
    previous = current()
    _local.context = context
    try:
        yield context
    finally:
        _local.context = previous
