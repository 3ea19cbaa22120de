"""Autoregressive generation for :class:`parallax_lightning.model.Decoder`.

With a cache the prompt is prefilled in one forward (the attention ops with queries aligned to the
end of the cached keys), then each new token runs one step through the decode ops
(``parallax_decode`` / ``softmax_decode``) against the cache. Without a cache every step recomputes
the full forward: slow, and the oracle the cached path is tested against.
"""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax at temperature 0, else a draw
    from softmax(logits / temperature) restricted to the top_k most likely tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, eos_id):
    c = model.config
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.is_floating_point() or prompt_ids.dim() not in (1, 2):
        raise ValueError("generate: prompt_ids must be an integer tensor of shape (T,) or (B, T)")
    if prompt_ids.shape[-1] < 1:
        raise ValueError("generate: prompt_ids must hold at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    total = prompt_ids.shape[-1] + max_new_tokens
    if total > c.max_seq_len:
        raise ValueError(
            f"generate: prompt ({prompt_ids.shape[-1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_seq_len={c.max_seq_len}"
        )
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
    if eos_id is not None and not 0 <= eos_id < c.vocab_size:
        raise ValueError(f"generate: eos_id={eos_id} is outside the vocabulary [0, {c.vocab_size})")
    lo, hi = int(prompt_ids.min()), int(prompt_ids.max())
    if lo < 0 or hi >= c.vocab_size:
        raise ValueError(f"generate: prompt token ids must lie in [0, {c.vocab_size}), got values in [{lo}, {hi}]")


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue `prompt_ids` (B, T) or (T,); returns prompt + new tokens in the same rank. Also
    `Decoder.generate` (`model.generate(prompt_ids, max_new_tokens, ...)`).

    temperature == 0 is greedy. top_k keeps the k most likely tokens before sampling. Once a
    sequence emits eos_id it is padded with eos_id; generation stops when all have. With
    use_cache=False every step recomputes the full forward (the oracle for the cached path).
    """
    _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, eos_id)
    squeeze = prompt_ids.dim() == 1
    seq = prompt_ids.unsqueeze(0) if squeeze else prompt_ids
    seq = seq.to(model.embed.weight.device)
    B = seq.shape[0]
    if max_new_tokens == 0:
        return prompt_ids
    done = torch.zeros(B, dtype=torch.bool, device=seq.device)
    cache = model.init_cache(B, seq.shape[1] + max_new_tokens) if use_cache else None
    logits = model(seq, cache)[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        seq = torch.cat([seq, token.unsqueeze(1)], dim=1)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        logits = model(token.unsqueeze(1), cache)[:, -1] if use_cache else model(seq)[:, -1]
    return seq.squeeze(0) if squeeze else seq
