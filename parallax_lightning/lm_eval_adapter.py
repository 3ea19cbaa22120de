"""EleutherAI lm-evaluation-harness (`pip install "parallax-lab[eval]"`) for any checkpoint of the platform.

`ParallaxLM` is an `lm_eval.api.model.LM` registered as ``parallax``:

    import parallax_lightning.lm_eval_adapter  # registers the model
    lm_eval.simple_evaluate(model="parallax", model_args="pretrained=runs/.../last.ckpt", tasks=["lambada_openai"])

or, with the results logged into the training run: ``python -m parallax_lightning eval --ckpt_path ... --tasks ...``.

- ``loglikelihood``: log p(continuation | context), the context cut from the left so that the sequence fits
  ``max_length`` (the model's max_seq_len by default); an empty context is the end-of-text token.
- ``loglikelihood_rolling`` (perplexity): the document after an end-of-text token, in windows of at most
  ``max_length`` tokens that predict every token exactly once — the first window predicts its first
  ``max_length`` tokens, each next one the following ``max_length`` with one token of context before them, as
  the platform's validation windows do (so the perplexity equals the validation loss on the same text); a
  last, shorter window keeps a full ``max_length`` of context. A sliding-window model sees within each
  window what its attention allows, exactly as in training.
- ``generate_until``: greedy decoding through the KV cache (the decode kernels on CUDA), stopped at any
  ``until`` string, the end-of-text token, or ``max_gen_toks``.

The module imports without lm_eval installed (the scoring methods work on their own); registration then
does not happen.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # lm-eval is an optional extra
    LM = object
    register_model = None

from .generate_cli import generate_text, resolve_dtype

MODEL_NAMES = ("parallax", "parallax_lightning")


def _as_int(value, name: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"ParallaxLM: {name} must be an integer, got {value!r}") from None
    if out < 1:
        raise ValueError(f"ParallaxLM: {name} must be >= 1, got {value!r}")
    return out


class ParallaxLM(LM):
    """lm-eval model over a parallax_lightning Decoder.

    Args (strings allowed, as lm-eval's ``model_args`` passes them):
        pretrained: a checkpoint written by ``fit`` or a folder written by ``export``.
        tokenizer: "byte" or a tokenizer.json path (default: the one the model was trained with).
        device: default cuda when available, else cpu. dtype: auto (bf16 on CUDA, stored dtype elsewhere),
            float32, bfloat16 or float16.
        batch_size: sequences per forward for the log-likelihoods. max_length: longest window (default and
            maximum: the model's max_seq_len). max_gen_toks: default generation length.
    Or build it around a loaded model with ``ParallaxLM.from_model(model, tokenizer)``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 16,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        attn_backend: str | None = None,
        max_batch_size: int | str | None = None,  # lm-eval passes it for automatic batch sizes: not used
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ValueError(
                f"ParallaxLM: unknown model_args {sorted(unknown)}; known: pretrained, tokenizer, device, dtype, "
                "batch_size, max_length, max_gen_toks, attn_backend"
            )
        if pretrained is None:
            raise ValueError("ParallaxLM: pass pretrained=CHECKPOINT_OR_EXPORTED_FOLDER")
        from .export import load_model

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        loaded = load_model(
            pretrained, tokenizer=tokenizer, device=dev, dtype=resolve_dtype(str(dtype), dev), attn_backend=attn_backend
        )
        self._setup(loaded.model, loaded.tokenizer, batch_size, max_length, max_gen_toks)

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 16, max_length: int | None = None, max_gen_toks: int = 256):
        """Around an already loaded Decoder and tokenizer (kept on their device and dtype)."""
        self = cls.__new__(cls)
        LM.__init__(self)
        self._setup(model.eval(), tokenizer, batch_size, max_length, max_gen_toks)
        return self

    def _setup(self, model, tokenizer, batch_size, max_length, max_gen_toks) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _as_int(batch_size, "batch_size")
        limit = model.config.max_seq_len
        self.max_length = limit if max_length in (None, "", "None") else _as_int(max_length, "max_length")
        if self.max_length > limit:
            raise ValueError(f"ParallaxLM: max_length={self.max_length} exceeds the model's max_seq_len={limit}")
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self.prefix_token_id = getattr(tokenizer, "eos_id", None)
        if self.prefix_token_id is None:
            raise ValueError(
                "ParallaxLM: the tokenizer has no end-of-text token (<|endoftext|>), which starts every scored "
                "document and empty context; use a tokenizer with one"
            )
        self._device = model.embed.weight.device
        self._warned_sampling = False

    # -- scoring ---------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    @torch.no_grad()
    def score(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """For each (input ids, targets): the summed log-probability of the targets, predicted by the last
        len(targets) positions of the input, and whether each target is the argmax there. Inputs are
        right-padded into batches (the model is causal: padding after a position does not change it)."""
        results: list[tuple[float, bool] | None] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = len(items[chunk[0]][0])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                inp, targets = items[i]
                if not 1 <= len(targets) <= len(inp) <= self.max_length:
                    raise ValueError(
                        f"ParallaxLM: a window of {len(inp)} tokens scoring {len(targets)} (max_length={self.max_length})"
                    )
                ids[row, : len(inp)] = torch.as_tensor(list(inp), dtype=torch.long)
            logits = self.model(ids.to(self._device))
            for row, i in enumerate(chunk):
                inp, targets = items[i]
                n, m = len(inp), len(targets)
                # fp32 on the scored rows only: the whole (batch, length, vocab) block in fp32 can take gigabytes
                logprobs = F.log_softmax(logits[row, n - m : n].float(), dim=-1)
                tgt = torch.as_tensor(list(targets), dtype=torch.long, device=logprobs.device)
                total = float(logprobs.gather(-1, tgt[:, None]).sum())
                greedy = bool((logprobs.argmax(-1) == tgt).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def context_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(input ids, target ids) for log p(continuation | context). Spaces at the end of the context belong
        to the continuation (lm-eval's convention: tokenizers attach them to the next word)."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped) :] + continuation
        ctx = self._encode(stripped) if stripped else [self.prefix_token_id]
        cont = self._encode(continuation)
        if len(cont) > self.max_length:
            raise ValueError(
                f"ParallaxLM: a continuation of {len(cont)} tokens does not fit max_length={self.max_length}"
            )
        whole = (ctx + cont)[-(self.max_length + 1) :]
        return whole[:-1], cont

    def rolling_windows(self, tokens: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """(input ids, target ids) windows predicting every token of `tokens` once (see the module docstring)."""
        L, tokens = self.max_length, list(tokens)
        if not tokens:
            return []
        done = min(L, len(tokens))
        windows = [([self.prefix_token_id, *tokens[: done - 1]], tokens[:done])]
        while done < len(tokens):
            m = min(L, len(tokens) - done)
            windows.append((tokens[done + m - L - 1 : done + m - 1], tokens[done : done + m]))
            done += m
        return windows

    # -- lm-eval's interface ---------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        items = [self.context_continuation(*req.args) for req in requests]
        scored = iter(self.score([it for it in items if it[1]]))
        # an empty continuation has probability one
        out = [next(scored) if cont else (0.0, True) for _, cont in items]
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        per_doc = [self.rolling_windows(self._encode(req.args[0])) for req in requests]
        flat = [w for windows in per_doc for w in windows]
        scores = iter(self.score(flat))
        out = []
        for req, windows in zip(requests, per_doc):
            total = sum(next(scores)[0] for _ in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if (kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0) and not self._warned_sampling:
                warnings.warn(
                    "ParallaxLM.generate_until decodes greedily; do_sample/temperature are ignored", stacklevel=2
                )
                self._warned_sampling = True
            max_new = max(1, min(max_new, self.model.config.max_seq_len - 1))
            ids = self._encode(context) or [self.prefix_token_id]
            ids = ids[-(self.model.config.max_seq_len - max_new) :]
            text = generate_text(self.model, self.tokenizer, ids, max_new, temperature=0.0, stop=until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


class _NoCache:
    def add_partial(self, *args) -> None:
        pass


if register_model is not None:
    ParallaxLM = register_model(*MODEL_NAMES)(ParallaxLM)
else:  # without lm-eval, the methods still run: give them the no-op cache hook LM.__init__ would
    ParallaxLM.cache_hook = _NoCache()
