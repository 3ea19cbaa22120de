"""Passkey retrieval: a random number hidden at a chosen depth of filler text, asked for at the end, answered
by greedy generation with the KV cache. Accuracy over a (context length × depth) grid shows where in a long
context a model still finds what it was told, and how far beyond its training length.

- `PasskeyTask`: builds prompts of an exact token length (any tokenizer with encode/decode) and scores
  completions.
- `PasskeyDataModule`: synthetic passkey sequences for training (loss on the answer only), so a small model
  can learn the task at length T and be tested on the grid up to 4T.
- `PasskeyEval`: a callback that runs the grid after validation (during `fit`, and in `validate` with a
  checkpoint), logging `passkey/acc`, `passkey/acc/len{L}`, `passkey/acc/depth{d}` and a heat-map figure
  `figures/passkey_heatmap.png` to the MLflow run.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from ..data.sampling import IndexedBatchStream
from ..data.token_datamodule import TokenDataModule
from ..data.tokenizers import load_tokenizer
from ..lm_module import IGNORE_INDEX
from .length_guard import beyond_max_seq_len, check_lengths

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "A pass key is hidden in the text below. Remember it.\n"
NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = "\nWhat is the pass key? The pass key is "


def check_depth(depth: float) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(
            f"passkey depth must be a number in [0, 1] (0 = right after the introduction, 1 = right before "
            f"the question), got {depth!r}"
        )
    return float(depth)


@dataclass
class PasskeyPrompt:
    """One prompt: `ids` (context_len tokens), the `answer` ids that follow it, the passkey and where the
    needle starts (token index)."""

    ids: np.ndarray
    answer: np.ndarray
    passkey: str
    needle_start: int


class PasskeyTask:
    """Prompts of exactly `context_len` tokens: intro, filler, the needle at `depth` of the filler, more
    filler, the question. The filler text repeats as needed and is cut at a token.

    Args:
        tokenizer: anything with `encode(text) -> ids` and `decode(ids) -> text` (the platform's tokenizers).
        digits: length of the passkey (its first digit is never 0).
        filler, intro, needle, question: the texts; `needle` holds `{key}` where the passkey goes.
    """

    def __init__(
        self,
        tokenizer,
        digits: int = 5,
        filler: str = FILLER,
        intro: str = INTRO,
        needle: str = NEEDLE,
        question: str = QUESTION,
    ):
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 18:
            raise ValueError(f"passkey digits must be an integer in [1, 18], got {digits!r}")
        if "{key}" not in needle:
            raise ValueError(f"the passkey needle must contain '{{key}}' where the number goes, got {needle!r}")
        self.tokenizer = tokenizer
        self.digits = digits
        self.needle = needle
        self._filler = self.encode(filler, "filler")
        self._intro = self.encode(intro, "intro") if intro else np.zeros(0, dtype=np.int64)
        self._question = self.encode(question, "question")

    def encode(self, text: str, what: str) -> np.ndarray:
        """Token ids of `text` (`what` names the part in the error when a required part encodes to nothing)."""
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64)
        if what in ("filler", "question") and len(ids) == 0:
            raise ValueError(f"the passkey {what} text encodes to no tokens: {text!r}")
        return ids

    def sample_passkey(self, rng: np.random.Generator) -> str:
        first = int(rng.integers(1, 10))
        rest = rng.integers(0, 10, size=self.digits - 1)
        return str(first) + "".join(str(int(d)) for d in rest)

    def min_context(self) -> int:
        """Tokens the fixed parts take (the shortest possible prompt)."""
        needle = self.encode(self.needle.format(key="9" * self.digits), "needle")
        return len(self._intro) + len(needle) + len(self._question)

    def prompt(self, context_len: int, depth: float, passkey: str) -> PasskeyPrompt:
        depth = check_depth(depth)
        if not re.fullmatch(r"\d+", passkey or ""):
            raise ValueError(f"a passkey is a string of digits, got {passkey!r}")
        needle = self.encode(self.needle.format(key=passkey), "needle")
        fixed = len(self._intro) + len(needle) + len(self._question)
        n_fill = context_len - fixed
        if n_fill < 0:
            raise ValueError(
                f"passkey context_len={context_len} is too short: the introduction, needle and question alone "
                f"take {fixed} tokens"
            )
        filler = np.resize(self._filler, n_fill) if n_fill else np.zeros(0, dtype=np.int64)
        before = round(depth * n_fill)
        ids = np.concatenate([self._intro, filler[:before], needle, filler[before:], self._question])
        answer = self.encode(passkey, "answer")
        return PasskeyPrompt(ids=ids, answer=answer, passkey=passkey, needle_start=len(self._intro) + before)

    def score(self, completion_ids, passkey: str) -> bool:
        """True when the completion starts (after spaces) with exactly the passkey's digits."""
        text = self.tokenizer.decode([int(i) for i in completion_ids])
        match = re.match(r"\s*(\d+)", text)
        return bool(match) and match.group(1) == passkey


def _tokenizer_from(spec: str | None, datamodule):
    if spec is not None:
        return load_tokenizer(spec)
    tokenizer = datamodule.get_tokenizer() if datamodule is not None and hasattr(datamodule, "get_tokenizer") else None
    if tokenizer is None:
        raise ValueError(
            "passkey retrieval needs a tokenizer to write its prompts: the data module has none; set the "
            'callback\'s `tokenizer` ("byte" or a tokenizer.json path)'
        )
    return tokenizer


# ------------------------------------------------------------------------------------------------- training
class _PasskeyStream(IndexedBatchStream):
    def __init__(self, module: PasskeyDataModule, rank: int, world_size: int, start: int, stop=None):
        super().__init__(rank=rank, world_size=world_size, start=start, stop=stop)
        self.m = module

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.m.seed, 0, index])
        batch = self.m.examples(rng, self.m.batch_size * self.world_size)
        part = self.rank_slice(self.m.batch_size)
        return {k: v[part] for k, v in batch.items()}


class _PasskeyEvalSet(Dataset):
    def __init__(self, module: PasskeyDataModule, n: int, batch_size: int):
        batch = module.examples(np.random.default_rng([module.seed, 1]), n)
        self.batches = [{k: v[i : i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class PasskeyDataModule(TokenDataModule):
    """Passkey sequences of `seq_len` tokens (prompt + answer), a random passkey at a uniform random depth;
    labels are the answer tokens (the rest -100). Batch i is a pure function of (seed, i).

    Args:
        tokenizer: "byte" (default) or a tokenizer.json path.
        digits: passkey length.
        filler: the filler text.
        num_val_examples: teacher-forced validation sequences (loss on the answers).
        batch_size: sequences per batch on each device (default 32 here).
        **kwargs: the loader settings of TokenDataModule (seq_len, vocab_size, seed, ...), val_fraction excepted.
    """

    def __init__(
        self,
        tokenizer: str = "byte",
        digits: int = 5,
        filler: str = FILLER,
        num_val_examples: int = 128,
        batch_size: int = 32,
        **kwargs,
    ):
        # Validation uses generated examples of its own, so no share of the data is held out.
        super().__init__(batch_size=batch_size, val_fraction=0.0, **kwargs)
        self.save_hyperparameters(logger=False)
        self.tokenizer = load_tokenizer(tokenizer)
        self.tokenizer_spec = tokenizer
        self.task = PasskeyTask(self.tokenizer, digits=digits, filler=filler)
        self.digits = digits
        self.num_val_examples = num_val_examples
        answer = len(self.task.encode("9" * digits, "answer"))
        if self.seq_len + 1 - answer < self.task.min_context():
            raise ValueError(
                f"data.seq_len={self.seq_len} is too short for a passkey prompt: the fixed text and a {digits}-digit "
                f"answer take {self.task.min_context() + answer - 1} tokens"
            )
        _ = self.vocab_size  # a vocabulary smaller than the tokenizer's fails now

    def _tokenizer_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _fingerprint(self) -> str:
        return f"passkey|{self.tokenizer_spec}|{self.digits}"

    def setup(self, stage: str | None = None) -> None:
        pass  # generated on the fly

    def examples(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        T = self.seq_len
        inputs = np.empty((n, T), dtype=np.int64)
        labels = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
        for row in range(n):
            key = self.task.sample_passkey(rng)
            answer_len = len(self.task.encode(key, "answer"))
            p = self.task.prompt(T + 1 - answer_len, float(rng.random()), key)
            full = np.concatenate([p.ids, p.answer])
            inputs[row] = full[:-1]
            labels[row, len(p.ids) - 1 :] = p.answer  # the answer is predicted from the question onwards
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}

    def train_stream(self, start: int | None = None, stop: int | None = None) -> _PasskeyStream:
        rank, world = self._rank_world()
        return _PasskeyStream(self, rank, world, self._stream_start(start), stop)

    def val_dataloader(self) -> DataLoader:
        return self._loader(_PasskeyEvalSet(self, self.num_val_examples, self.batch_size))


# --------------------------------------------------------------------------------------------- evaluation
def passkey_grid(
    model,
    task: PasskeyTask,
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int = 0,
    batch_size: int | None = None,
    context=None,
) -> np.ndarray:
    """Accuracy (len(lengths), len(depths)): greedy generation with the KV cache from prompts of exactly
    that many tokens. Cell (L, d) uses the same passkeys in every call with the same seed."""
    decoder = getattr(model, "model", model)
    device = next(decoder.parameters()).device
    acc = np.zeros((len(lengths), len(depths)))
    digits_tokens = max(len(task.encode("9" * task.digits, "answer")), 1)
    for i, L in enumerate(lengths):
        for j, depth in enumerate(depths):
            rng = np.random.default_rng([seed, int(L), j])
            prompts = [task.prompt(int(L), depth, task.sample_passkey(rng)) for _ in range(samples)]
            new = digits_tokens + 1  # one token of slack for tokenizers that split digits differently
            correct = 0
            step = batch_size or samples
            with beyond_max_seq_len(decoder, int(L) + new) as dec:
                for k in range(0, samples, step):
                    chunk = prompts[k : k + step]
                    ids = torch.as_tensor(np.stack([p.ids for p in chunk]), device=device)
                    with context() if context is not None else contextlib.nullcontext():
                        out = dec.generate(ids, max_new_tokens=new, temperature=0.0, use_cache=True)
                    for p, row in zip(chunk, out[:, ids.shape[1] :].tolist()):
                        correct += task.score(row, p.passkey)
            acc[i, j] = correct / samples
    return acc


def heatmap_figure(acc: np.ndarray, lengths: list[int], depths: list[float], title: str = "", train_len=None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.1 * len(lengths) + 2.5, 0.5 * len(depths) + 2.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(acc.T, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length (tokens)" + (f"; trained at {train_len}" if train_len else ""))
    ax.set_ylabel("passkey depth")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(i, j, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title or "passkey retrieval")
    return fig


class PasskeyEval(Callback):
    """Passkey accuracy on a (context length × depth) grid after validation, logged to the run.

    Args:
        lengths: context lengths in tokens; None = 1, 2 and 4 times the data's `seq_len`.
        depths: needle depths in [0, 1].
        samples: prompts per cell.
        digits: passkey length.
        every_n_validations: run after every n-th validation of `fit` (0 = only after the last); `validate`
            always runs it.
        tokenizer: None = the data module's tokenizer; else "byte" or a tokenizer.json path.
        batch_size: prompts generated together (None = all of a cell).
        seed: which passkeys (the same grid of prompts for every run with this seed).
    """

    def __init__(
        self,
        lengths: list[int] | None = None,
        depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        samples: int = 8,
        digits: int = 5,
        every_n_validations: int = 1,
        tokenizer: str | None = None,
        batch_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.depths = [check_depth(d) for d in depths]
        check_lengths(lengths, "PasskeyEval")
        if samples < 1 or every_n_validations < 0:
            raise ValueError("PasskeyEval: samples must be >= 1 and every_n_validations >= 0")
        self.lengths = list(lengths) if lengths is not None else None
        self.samples = samples
        self.digits = digits
        self.every_n_validations = every_n_validations
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self._validations = 0
        self._evaluated_at: int | None = None
        self.last: np.ndarray | None = None

    def _grid_lengths(self, trainer) -> list[int]:
        if self.lengths is not None:
            return self.lengths
        T = getattr(trainer.datamodule, "seq_len", None) if trainer.datamodule is not None else None
        if T is None:
            raise ValueError("PasskeyEval: set `lengths` (the data module has no seq_len to scale)")
        return [T, 2 * T, 4 * T]

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._validations += 1
            last = trainer.max_steps is not None and trainer.global_step >= trainer.max_steps
            n = self.every_n_validations
            if not last and (n == 0 or self._validations % n):
                return
        self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self._evaluated_at != trainer.global_step:  # the last step was not a validation step
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> np.ndarray | None:
        if trainer.global_rank != 0:
            return None
        task = PasskeyTask(_tokenizer_from(self.tokenizer, trainer.datamodule), digits=self.digits)
        lengths = self._grid_lengths(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            acc = passkey_grid(
                pl_module,
                task,
                lengths,
                self.depths,
                self.samples,
                seed=self.seed,
                batch_size=self.batch_size,
                context=trainer.precision_plugin.forward_context,
            )
        finally:
            pl_module.train(was_training)
        self.last = acc
        step = self._evaluated_at = trainer.global_step
        metrics = {"passkey/acc": float(acc.mean())}
        metrics.update({f"passkey/acc/len{L}": float(acc[i].mean()) for i, L in enumerate(lengths)})
        metrics.update({f"passkey/acc/depth{d:g}": float(acc[:, j].mean()) for j, d in enumerate(self.depths)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        train_len = getattr(trainer.datamodule, "seq_len", None)
        fig = heatmap_figure(acc, lengths, self.depths, f"passkey retrieval, step {step}", train_len)
        from ..callbacks import save_figure

        save_figure(trainer, fig, "figures/passkey_heatmap.png")
        return acc
