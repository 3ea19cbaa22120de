"""Input validation shared by every attention op.

All checks run before any work is launched, and every message names the offending argument and
value, so that a wrong call fails at the call site rather than deep inside a kernel.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttnShape:
    """Sizes of one attention call, layout (batch, seq, heads, head_dim)."""

    batch: int
    seq_q: int
    seq_k: int
    heads_q: int
    heads_kv: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.heads_q // self.heads_kv


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{op}: {name} must have 4 dims (batch, seq, heads, head_dim), got {t.dim()} dims ({_describe(t)})"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
    if t.is_sparse or t.is_complex():
        raise ValueError(f"{op}: {name} must be a dense real tensor ({_describe(t)})")


def check_same(op: str, named: dict[str, torch.Tensor]) -> None:
    """Same dtype and device for every named tensor."""
    (first_name, first), *rest = named.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: dtype mismatch: {first_name} is {first.dtype} but {name} is {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: device mismatch: {first_name} is on {first.device} but {name} is on {t.device}")


def check_scale(op: str, scale) -> None:
    if scale is None:
        return
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a Python float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: scale must be a finite positive number, got {scale}")


def check_window(op: str, window_size, causal: bool) -> None:
    if window_size is None:
        return
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"{op}: window_size must be an int or None, got {type(window_size).__name__}")
    if window_size < 1:
        raise ValueError(
            f"{op}: window_size must be >= 1 (the number of keys seen, the diagonal included), got {window_size}"
        )
    if not causal:
        raise ValueError(f"{op}: window_size={window_size} needs causal=True (the window looks back only)")


def check_attn_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor | None = None,
    *,
    causal: bool = True,
    scale=None,
    window_size=None,
    q_name: str = "q",
) -> AttnShape:
    """Validate (B, T, H, D) attention inputs; return their sizes.

    q (and r, when given) have H_q heads, k and v have H_kv heads with H_q % H_kv == 0.
    With causal=True and T_q < T_k the queries are the last T_q positions of the keys.
    """
    named = {q_name: q} if r is None else {q_name: q, "r": r}
    named.update(k=k, v=v)
    for name, t in named.items():
        check_tensor(name, t, op)
    check_same(op, named)
    check_scale(op, scale)
    check_window(op, window_size, causal)

    B, Tq, Hq, D = q.shape
    Bk, Tk, Hkv, Dk = k.shape
    if r is not None and r.shape != q.shape:
        raise ValueError(
            f"{op}: r must have the shape of {q_name} {tuple(q.shape)} (one probe per query head), got {tuple(r.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"{op}: batch mismatch: {q_name} has batch {B}, k has batch {Bk}")
    if Dk != D:
        raise ValueError(f"{op}: head_dim mismatch: {q_name} has head_dim {D}, k has head_dim {Dk}")
    if min(B, Tq, Tk, Hq, Hkv, D) < 1:
        raise ValueError(f"{op}: empty input: {q_name} {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"{op}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA")
    if causal and Tq > Tk:
        raise ValueError(
            f"{op}: causal attention with more queries ({Tq}) than keys ({Tk}): queries are aligned to the "
            f"end of the keys, so {Tq - Tk} rows would see no key"
        )
    return AttnShape(B, Tq, Tk, Hq, Hkv, D)


def check_cu_seqlens(
    op: str, cu_seqlens, total: int, device: torch.device, batch: int, *, max_seqlen=None, seq_k: int | None = None
):
    """flash-attn convention: int32 offsets [0, l0, l0+l1, ..., total] into a packed batch of size 1.

    seq_k, the keys' packed length where the caller has keys, must equal total (the queries'): the same offsets
    cut both.

    Without max_seqlen the offsets are read on the host, checked (a ValueError names them) and returned as a
    list. With max_seqlen (already checked to be an int in [1, total]) the caller must not synchronize: the
    same rule, plus no sequence longer than max_seqlen, is checked on the tensor's device (`device_assert`)
    and None is returned. The kernels clamp every offset into [0, total] as well, so offsets that escape
    the check (an assert that has not fired yet) can make a wrong result, never a read or write outside
    the tensors.
    """
    if seq_k is not None and seq_k != total:
        raise ValueError(f"{op}: with cu_seqlens, q and k must have the same packed length, got {total} and {seq_k}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D int32 tensor of offsets, got dtype {cu_seqlens.dtype} "
            f"and shape {tuple(cu_seqlens.shape)}"
        )
    if batch != 1:
        raise ValueError(f"{op}: with cu_seqlens the sequences are packed into batch 1, got batch {batch}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens needs at least 2 offsets, got {cu_seqlens.numel()}")
    if max_seqlen is not None:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        shortest, longest = torch.aminmax(lengths)
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (shortest >= 1) & (longest <= max_seqlen)
        device_assert(
            ok,
            f"{op}: cu_seqlens must start at 0, end at the packed length {total} and increase strictly, "
            f"with no sequence longer than max_seqlen={max_seqlen}",
            lambda: [int(x) for x in cu_seqlens],
        )
        return None
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and end at the packed length {total}, got {offsets}")
    if any(b <= a for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"{op}: cu_seqlens must be strictly increasing (no empty sequences), got {offsets}")
    return offsets


def device_assert(ok: torch.Tensor, message: str, got=None) -> None:
    """Raise unless the one-element bool tensor `ok` is True, without making the host wait for a GPU.

    On CPU (outside torch.compile) the flag is read at once and a ValueError carries `message` and, when
    `got` is given, what got() returns. Elsewhere the check is queued on the device: torch offers no
    public asynchronous assert, so this is the one place that calls torch._assert_async. On CUDA a
    failure is a device-side assert, raised at a later synchronization without the message, and it
    leaves the CUDA context unusable (the process must restart); that is the price of not syncing.
    """
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not ok.item():
            raise ValueError(message if got is None else f"{message}; got {got()}")
        return
    torch._assert_async(ok, message)


def check_cache_seqlens(op: str, cache_seqlens, batch: int, device: torch.device) -> None:
    """The form of decode lengths (None, or an int32/int64 tensor of shape (batch,) on q's device); their
    values are checked by `check_cache_seqlens_values`."""
    if cache_seqlens is None:
        return
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cache_seqlens must be a torch.Tensor or None, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(
            f"{op}: cache_seqlens must be an int32 tensor of shape ({batch},), got dtype {cache_seqlens.dtype} "
            f"and shape {tuple(cache_seqlens.shape)}"
        )
    if cache_seqlens.device != device:
        raise ValueError(f"{op}: cache_seqlens is on {cache_seqlens.device} but q is on {device}")


def check_flag(op: str, name: str, value) -> None:
    """A bool option: None or 1 would pass as a truth value and quietly mean something else."""
    if value is not True and value is not False:
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on t's device stream (then nothing may read t on the host)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def refuse_host_read_under_capture(op: str, t, reads: str, fix: str) -> None:
    """Raise a RuntimeError naming the read and its fix if `reads` (a host read of t) would happen while a CUDA
    graph is being captured, where it would fail inside CUDA instead."""
    if isinstance(t, torch.Tensor) and capturing(t):
        raise RuntimeError(
            f"{op}: {reads} on the host, which cannot happen while a CUDA graph is being captured; {fix}"
        )


def check_cache_seqlens_values(op: str, cache_seqlens: torch.Tensor, L_max: int, low: int = 1) -> None:
    """Every decode length in [low, L_max] (low = 1 for one new token: the rule of every decode backend),
    read on the host: a device sync for a CUDA tensor, and impossible while a CUDA graph is captured."""
    refuse_host_read_under_capture(
        op,
        cache_seqlens,
        "check_lengths=True reads cache_seqlens",
        "pass check_lengths=False (a length outside the cache then gives a NaN output row)",
    )
    lo, hi = torch.stack(torch.aminmax(cache_seqlens)).tolist()  # one sync
    if lo < low or hi > L_max:
        bad = [n for n in cache_seqlens.tolist() if not low <= n <= L_max]
        raise ValueError(f"{op}: cache_seqlens must lie in [{low}, {L_max}], got {bad}")
