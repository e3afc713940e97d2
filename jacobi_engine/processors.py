"""The generation_config logits processors that change greedy output, applied to every block slot
with its own prefix.

HF applies its processors to the next-token scores of one position, given ``input_ids``: the
prompt exactly as passed (left padding included) followed by the tokens generated so far. In a
Jacobi block, slot ``j`` predicts the token after ``[prompt, generated, block[1..j]]``, so each
slot is processed as HF would process that position: its own ``cur_len`` and its own prefix.
The fixed point of the iteration is then HF's greedy output *with* the processors.

Everything runs as tensor ops on the device with static shapes (no host sync), so a processed
step can still be captured in a CUDA graph. Each processor mirrors the arithmetic of its HF
counterpart (same comparisons, same ``where``/``+``), so ties and NaNs resolve the same way.

Which processors a call uses (its :class:`~jacobi_engine.generation.ProcessorSpec`) is resolved
with the rest of its settings by :func:`jacobi_engine.generation.resolve_generation`.
"""

from __future__ import annotations

import math

import torch

from jacobi_engine.generation import ProcessorSpec


class LogitsProcessing:
    """Applies a :class:`ProcessorSpec` to block scores, each slot with its own prefix.

    ``apply(scores, history, cur_len, pad_lengths)``:

    * ``scores`` float [B, m, V]: slot ``j`` scores the token after the first ``cur_len[b, j]``
      tokens of ``history[b]``;
    * ``history`` int64 [B, W]: HF's ``input_ids`` view, i.e. the prompt as passed (padding
      included) then every token fed so far, the block's guesses included;
    * ``cur_len`` int64 [B, m]: HF's ``input_ids.shape[-1]`` at each slot;
    * ``pad_lengths`` int64 [B]: leading padding of each prompt (HF's ``prompt_ignore_length``
      for the repetition penalty).

    Returns new scores [B, m, V] (the input is not modified).
    """

    def __init__(self, spec: ProcessorSpec, vocab_size: int, device: torch.device):
        self.spec = spec
        self.vocab_size = vocab_size
        self.device = device
        vocab = torch.arange(vocab_size, device=device)

        def token_mask(ids) -> torch.Tensor | None:
            if not ids:
                return None
            return torch.isin(vocab, torch.tensor(list(ids), dtype=torch.long, device=device))

        self.eos_mask = token_mask(spec.eos_ids)
        self.suppress_mask = token_mask(spec.suppress_tokens)
        self.begin_suppress_mask = token_mask(spec.begin_suppress_tokens)
        self.forced_eos_mask = token_mask(spec.forced_eos_token_id)
        single = [word[0] for word in spec.bad_words if len(word) == 1]
        self.single_bad_mask = token_mask(single)
        self.multi_bad = [
            (torch.tensor(word[:-1], dtype=torch.long, device=device), word[-1])
            for word in spec.bad_words
            if len(word) > 1
        ]

    def apply(
        self, scores: torch.Tensor, history: torch.Tensor, cur_len: torch.Tensor, pad_lengths: torch.Tensor
    ) -> torch.Tensor:
        spec = self.spec
        inf = float("inf")
        if spec.repetition_penalty is not None:
            present = self._present_tokens(history, cur_len, pad_lengths, scores.shape[-1])
            penalty = spec.repetition_penalty
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(present, penalised, scores)
        if spec.no_repeat_ngram_size > 0:
            banned = self._banned_ngram_tokens(history, cur_len, spec.no_repeat_ngram_size, scores.shape[-1])
            scores = scores.masked_fill(banned, -inf)
        if spec.bad_words:
            scores = scores + self._bad_words_bias(history, cur_len, scores)
        if self.eos_mask is not None and spec.min_length > 0:
            short = (cur_len < spec.min_length)[..., None]
            scores = torch.where(short & self.eos_mask, -inf, scores)
        if self.eos_mask is not None and spec.min_new_tokens > 0:
            short = (cur_len - spec.prompt_width < spec.min_new_tokens)[..., None]
            scores = torch.where(short & self.eos_mask, -inf, scores)
        if spec.forced_bos_token_id is not None:
            forced = torch.full_like(scores[:1, :1], -inf)
            forced[..., spec.forced_bos_token_id] = 0
            scores = torch.where((cur_len == 1)[..., None], forced, scores)
        if self.forced_eos_mask is not None:
            forced = torch.where(self.forced_eos_mask, 0.0, -inf).to(scores.dtype)
            scores = torch.where((cur_len == spec.max_length - 1)[..., None], forced, scores)
        if spec.remove_invalid_values:
            finfo = torch.finfo(scores.dtype)
            cleaned = torch.where(scores != scores, 0.0, scores)
            cleaned = torch.where(scores == inf, finfo.max, cleaned)
            scores = torch.where(scores == -inf, finfo.min, cleaned)
        if self.suppress_mask is not None:
            scores = torch.where(self.suppress_mask, -inf, scores)
        if self.begin_suppress_mask is not None:
            at_begin = (cur_len == spec.begin_index)[..., None]
            scores = torch.where(at_begin & self.begin_suppress_mask, -inf, scores)
        if spec.renormalize_logits:
            scores = scores.log_softmax(dim=-1)
        return scores

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _prefix_columns(history: torch.Tensor, cur_len: torch.Tensor) -> torch.Tensor:
        """bool [B, m, W]: column k of history lies in slot j's prefix (k < cur_len[b, j])."""
        columns = torch.arange(history.shape[1], device=history.device)
        return columns[None, None, :] < cur_len[..., None]

    def _present_tokens(self, history, cur_len, pad_lengths, vocab) -> torch.Tensor:
        """bool [B, m, V]: the token occurs in slot j's prefix past the leading padding."""
        columns = torch.arange(history.shape[1], device=history.device)
        inside = self._prefix_columns(history, cur_len) & (columns[None, None, :] >= pad_lengths[:, None, None])
        # Columns outside the prefix point at a spare column V, dropped afterwards (as HF does).
        index = torch.where(inside, history[:, None, :], vocab)
        present = torch.zeros((*cur_len.shape, vocab + 1), dtype=torch.bool, device=history.device)
        present.scatter_(2, index, True)
        return present[..., :vocab]

    def _banned_ngram_tokens(self, history, cur_len, size, vocab) -> torch.Tensor:
        """bool [B, m, V]: tokens that would repeat an n-gram of slot j's prefix (HF's NoRepeatNGram)."""
        batch, width = history.shape
        banned = torch.zeros((*cur_len.shape, vocab + 1), dtype=torch.bool, device=history.device)
        if width < size:
            return banned[..., :vocab]
        windows = history.unfold(1, size, 1)  # [B, W - size + 1, size]
        starts = torch.arange(windows.shape[1], device=history.device)
        # The last size-1 tokens of each slot's prefix.
        offsets = torch.arange(1 - size, 0, device=history.device)
        suffix_columns = (cur_len[..., None] + offsets).clamp(min=0)  # [B, m, size-1]
        suffix = history.gather(1, suffix_columns.reshape(batch, -1)).reshape(*cur_len.shape, size - 1)
        matches = (windows[:, None, :, : size - 1] == suffix[:, :, None, :]).all(dim=-1)  # [B, m, starts]
        complete = starts[None, None, :] + size <= cur_len[..., None]  # the n-gram lies inside the prefix
        hit = matches & complete & (cur_len[..., None] >= size)
        index = torch.where(hit, windows[:, None, :, size - 1], vocab)
        banned.scatter_(2, index, True)
        return banned[..., :vocab]

    def _bad_words_bias(self, history, cur_len, scores) -> torch.Tensor:
        """float [B, m, V] of 0 and -inf, HF's SequenceBias arithmetic for bad_words_ids."""
        bias = torch.zeros_like(scores)
        if self.single_bad_mask is not None:
            bias = bias + torch.where(self.single_bad_mask, -math.inf, 0.0).to(scores.dtype)
        for prefix, last in self.multi_bad:
            k = prefix.numel()
            offsets = torch.arange(-k, 0, device=history.device)
            columns = (cur_len[..., None] + offsets).clamp(min=0)  # [B, m, k]
            tail = history.gather(1, columns.reshape(history.shape[0], -1)).reshape(*cur_len.shape, k)
            match = (tail == prefix).all(dim=-1) & (cur_len >= k)
            bias[..., last] = bias[..., last] + torch.where(match, -math.inf, 0.0).to(scores.dtype)
        return bias
