"""`python -m parallax_lightning generate --ckpt_path CKPT --prompt TEXT`: text streamed as it is produced.

The prompt is prefilled once into a KV cache, then every new token is one decode step against the cache
(the decode kernels on CUDA, the same dispatch as `Decoder.generate`). Text is decoded incrementally: a
piece is printed once it is whole (a multi-byte character split over tokens waits for its last byte) and
once it cannot be the start of a stop string.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from .generation import sample_next


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): greedy at temperature 0, else top-k, then nucleus (top-p) sampling."""
    if temperature == 0 or top_p is None or top_p >= 1:
        return sample_next(logits, temperature, top_k, generator)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def stream_tokens(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Token ids continuing one prompt, yielded one at a time (prefill once, then one cached decode step each).

    Stops after max_new_tokens, or after yielding eos_id. Greedy output equals `model.generate(...,
    temperature=0)`."""
    _check_sampling(temperature, top_k, top_p)
    c = model.config
    device = model.embed.weight.device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] < 1:
        raise ValueError("generate: the prompt must hold at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if ids.shape[1] + max_new_tokens > c.max_seq_len:
        raise ValueError(
            f"generate: prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len={c.max_seq_len}; shorten the prompt or lower --max_new_tokens"
        )
    if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size:
        raise ValueError(f"generate: prompt token ids must lie in [0, {c.vocab_size})")
    if max_new_tokens == 0:
        return
    cache = model.init_cache(1, ids.shape[1] + max_new_tokens)
    logits = model(ids, cache)[:, -1]
    for step in range(max_new_tokens):
        token = sample_token(logits, temperature, top_k, top_p, generator)
        value = int(token.item())
        yield value
        if value == eos_id or step == max_new_tokens - 1:
            return
        logits = model(token.view(1, 1), cache)[:, -1]


class TextStream:
    """Turns token ids into text pieces that are safe to print: whole characters only, and never a piece
    that a stop string might still complete. `done` is set once a stop string appears; `text` is then
    the generated text up to (not including) it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False

    def _held(self, text: str) -> int:
        """Characters at the end of text that could begin a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def push(self, token: int) -> str:
        """Add a token; return the new printable text (possibly empty)."""
        if self.done:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.text = text[: min(hits)]
            self.done = True
            return self._emit(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        return self._emit(len(text) - self._held(text))

    def flush(self) -> str:
        """The rest, at the end of generation."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


def generate_text(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    generator: torch.Generator | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Continue `prompt` (text, or token ids); stop at the tokenizer's end-of-text token, a stop string, or
    max_new_tokens. Returns the generated text (without the stop string); `on_text` receives it piece by piece."""
    ids = [int(i) for i in (tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)]
    if not ids:
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise ValueError("generate: the prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [eos]  # an empty prompt starts a new document
    eos_id = getattr(tokenizer, "eos_id", None)
    stream = TextStream(tokenizer.decode, stop)
    for token in stream_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id, generator):
        if token == eos_id:
            break
        piece = stream.push(token)
        if piece and on_text is not None:
            on_text(piece)
        if stream.done:
            break
    rest = stream.flush()
    if rest and on_text is not None:
        on_text(rest)
    return stream.text


def generate_main(args: list[str]) -> int:
    from .export import CheckpointError, load_model

    parser = argparse.ArgumentParser(
        prog="python -m parallax_lightning generate",
        description="Continue a prompt with a trained model, printing tokens as they are produced.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `fit`, or a folder from `export`")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop before any of these strings")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    parser.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the model's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bf16 on CUDA, else fp32",
    )
    opts = parser.parse_args(args)
    try:
        _check_sampling(opts.temperature, opts.top_k, opts.top_p)
        if opts.max_new_tokens < 0:
            raise ValueError(f"--max_new_tokens must be >= 0, got {opts.max_new_tokens}")
        device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(opts.dtype, device)
        loaded = load_model(opts.ckpt_path, tokenizer=opts.tokenizer, device=device, dtype=dtype)
        room = loaded.model.config.max_seq_len - max(1, len(loaded.tokenizer.encode(opts.prompt)))
        if opts.max_new_tokens > room:
            raise ValueError(
                f"the prompt leaves room for {max(room, 0)} new tokens (max_seq_len="
                f"{loaded.model.config.max_seq_len}); lower --max_new_tokens or shorten the prompt"
            )
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"parallax_lightning generate: {err}", file=sys.stderr)
        return 2
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate_text(
        loaded.model,
        loaded.tokenizer,
        opts.prompt,
        opts.max_new_tokens,
        opts.temperature,
        opts.top_k,
        opts.top_p,
        opts.stop,
        generator,
        on_text=show,
    )
    sys.stdout.write("\n")
    return 0


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """'auto' (bf16 on CUDA, the stored dtype elsewhere) or a dtype name."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None
