"""The engine's KV cache: static per-layer buffers and per-sequence lengths.

Layout follows ``flash_attn_with_kvcache``: each layer holds ``keys`` [B, S, Hkv, D_k] and
``values`` [B, S, Hkv, D_v] (D_k != D_v for multi-head latent attention) and the whole cache shares ``cache_seqlens`` int32 [B], the number of
committed tokens of each sequence. A Jacobi block is written in place at rows
``cache_seqlens[b] ..`` by the attention op itself; committing accepted tokens is just
``cache_seqlens += n_accepted``. Rejected guesses are never cropped: the next block
overwrites them.

The class plugs into Hugging Face models as a ``transformers.Cache``. Its ``update()`` does
not copy anything: it hands the new K/V back unchanged and remembers which layer is
running, and the registered attention function (:mod:`jacobi_engine.attention`) performs
the fused append + attend on this layer's buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from jacobi_engine import context as forward_context


class JacobiCache(Cache):
    """Static KV cache with per-sequence lengths.

    Args:
        num_layers: decoder layers of the model.
        batch_size: sequences in the batch (B).
        max_seq_len: rows per sequence (S); must cover prompt + generated tokens + one block.
        device: where the buffers live.

    Buffers are allocated lazily at the first attention call of each layer, from the dtype, head
    count and head sizes of the K/V it receives, so any attention geometry works (D_k != D_v too).
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, device: torch.device):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.batch = batch_size
        self.capacity = max_seq_len
        self.device = torch.device(device)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        # A constant 2-D attention mask for models that want one; see prefill.ModelForward.
        self.ones_mask = torch.ones(batch_size, max_seq_len, dtype=torch.long, device=self.device)
        # A 4-D placeholder mask: transformers' mask creation returns a 4-D mask as given, so an engine
        # forward builds no mask at all (our attention masks by cache_seqlens and never reads it).
        self.no_mask = torch.ones(batch_size, 1, 1, 1, dtype=torch.bool, device=self.device)
        self._scratch()
        self.parent: tuple[JacobiCache, int, int] | None = None  # (cache, start, stop) of a row view

    def rows(self, start: int, stop: int) -> JacobiCache:
        """A view of rows ``start:stop``: its buffers and ``cache_seqlens`` are slices of this cache's, so a
        forward on the view (a request's prefill while the other rows keep decoding) writes in place."""
        view = JacobiCache.__new__(JacobiCache)
        Cache.__init__(view, layers=[])
        view.num_layers, view.batch, view.capacity, view.device = (
            self.num_layers,
            stop - start,
            self.capacity,
            self.device,
        )
        view.cache_seqlens = self.cache_seqlens[start:stop]
        view.ones_mask = self.ones_mask[start:stop]
        view.no_mask = self.no_mask[start:stop]
        view._scratch()
        view.parent = (self, start, stop)
        return view

    def _scratch(self) -> None:
        """Per-forward bookkeeping of the attention dispatch (see end_forward)."""
        self.current_layer: int | None = None
        # The block K/V each layer's update() returned in the running forward. A layer that reuses
        # another layer's K/V (Gemma-3n's shared-KV layers) calls attention with those very
        # tensors and no update() of its own; identity tells the dispatch whose buffers they are.
        self.block_keys: dict[int, torch.Tensor] = {}
        self.block_values: dict[int, torch.Tensor] = {}
        # (layer, block length) pairs whose attention arguments were checked in this call, and the
        # block layout (mask, rows) of the running forward, shared by its layers.
        self.attention_checked: set[tuple[int, int]] = set()
        self.layouts: dict[tuple, object] = {}

    # -- our interface ---------------------------------------------------------------------
    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The [B, S, Hkv, D_k] key and [B, S, Hkv, D_v] value buffers of one layer."""
        if self.parent is not None:
            parent, start, stop = self.parent
            keys, values = parent.layer(layer_idx)
            return keys[start:stop], values[start:stop]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys is None or values is None:
            raise RuntimeError(f"layer {layer_idx} of the Jacobi cache was never written")
        return keys, values

    def reset(self) -> None:
        """Forget all sequences (buffers are kept and simply overwritten later)."""
        self.cache_seqlens.zero_()
        self.attention_checked.clear()
        self.end_forward()

    def end_forward(self) -> None:
        """Drops what one forward left behind (the block K/V of each layer, the step layout).

        Under ``torch.compile`` anything left on this object is a side effect the graph must
        return, and the next step would see (and guard on) it; cleared, every step starts alike.
        """
        self.block_keys.clear()
        self.block_values.clear()
        self.layouts.clear()
        self.current_layer = None

    def key_value_buffers(self) -> list[torch.Tensor]:
        """Every allocated [B, S, Hkv, D] key and value buffer, once each."""
        if self.parent is not None:
            parent, start, stop = self.parent
            return [t[start:stop] for t in parent.key_value_buffers()]
        return [t for t in self.keys + self.values if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key_value_buffers())

    # -- transformers.Cache interface -----------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by the model with this layer's new K/V; returns them unchanged and copies nothing.

        The buffers are allocated by :meth:`buffers` from the K/V the attention receives, which
        may differ from these: MLA models cache a latent here and expand it into per-head keys
        ([B, H, n, D_k]) and values ([B, H, n, D_v], D_v != D_k) before attention. Any per-token
        transform is exact, because the engine stores the transformed rows themselves.
        """
        if layer_idx >= self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {self.num_layers} layers")
        self.current_layer = layer_idx
        self.block_keys[layer_idx] = key_states
        self.block_values[layer_idx] = value_states
        return key_states, value_states

    def buffers(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """This layer's buffers for block K/V ``[B, Hkv, n, D_k]`` / ``[B, Hkv, n, D_v]``, allocated at first use."""
        if self.parent is not None:
            parent, start, stop = self.parent
            keys, values = parent.buffers(layer_idx, key_states, value_states)
            return keys[start:stop], values[start:stop]
        n_kv_heads, head_dim, value_dim = key_states.shape[1], key_states.shape[3], value_states.shape[3]
        if self.keys[layer_idx] is None:
            # Zero-filled so that rows never written are finite (see reference.jacobi_attention).
            shape = (self.batch, self.capacity, n_kv_heads)
            self.keys[layer_idx] = torch.zeros((*shape, head_dim), dtype=key_states.dtype, device=self.device)
            self.values[layer_idx] = torch.zeros((*shape, value_dim), dtype=value_states.dtype, device=self.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys.shape[2:] != (n_kv_heads, head_dim) or values.shape[2:] != (value_states.shape[1], value_dim):
            raise ValueError(
                f"layer {layer_idx} attended with K/V of head shapes {tuple(key_states.shape[1::2])} / "
                f"{tuple(value_states.shape[1::2])}, but its cache holds {tuple(keys.shape[2:])} / {tuple(values.shape[2:])}"
            )
        return keys, values

    def producer_of(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int | None:
        """The layer whose update() returned exactly these K/V tensors in this forward, if any."""
        for layer_idx, block_key in self.block_keys.items():
            if block_key is key_states and self.block_values[layer_idx] is value_states:
                return layer_idx
        return None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Models only use this to infer positions when none are given; the engine always gives
        # them. Return the forward's host-side bound rather than syncing on cache_seqlens.
        ctx = forward_context.current()
        bound = ctx.kv_len_bound if ctx is not None and ctx.cache is self else None
        return 0 if bound is None else int(bound)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    def get_max_length(self) -> int:
        return self.capacity

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.capacity, 0

    @property
    def batch_size(self) -> int:
        return self.batch

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def is_initialized(self) -> bool:
        owner = self.parent[0] if self.parent is not None else self
        return all(k is not None for k in owner.keys)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return (
            f"JacobiCache(layers={self.num_layers}, batch={self.batch}, capacity={self.capacity}, device={self.device})"
        )
