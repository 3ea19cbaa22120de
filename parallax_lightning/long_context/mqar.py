"""Multi-query associative recall (MQAR), the Zoology formulation (Arora et al., 2023), generated on the fly.

A sequence of `seq_len` tokens starts with `num_kv_pairs` key–value pairs, interleaved (k1 v1 k2 v2 …), and
continues with a query region in which every key appears once more, each at its own even slot; the model
must answer each query with the key's value. Keys come from [1, V/2), values from [V/2, V) (token 0 is the
blank of the query region), so the two ranges are disjoint. Query slots are drawn without replacement with
probability ∝ (g + 1)^(power_a − 1) for slot g = 0, 1, … after the context, a power law that puts most queries
near the context (Zoology's `power_a` = 0.01) and some far from it. The other tokens of the query region are
random noise (or the blank 0 with `random_non_queries=False`). Labels hold the value at each query position
(the model predicts it from the query key) and -100 everywhere else, so loss and accuracy are measured on
the answers only.

Every batch is a pure function of the seed and its index: training batch i of any run with the same seed
is the same, with any number of data-loader workers or devices, and resuming continues the stream exactly.

- `mqar_examples` / `check_mqar`: the generator and its input checks (numpy only).
- `MQARSetting`: one (seq_len, num_kv_pairs) pair; training mixes several, evaluation keeps each apart.
- `MQARDataModule`: the training mixture and the evaluation sets (in-distribution, length extrapolation,
  kv-count extrapolation).
- `MQARModule`: the platform's `LanguageModelModule` plus answer accuracy per evaluation slice, logged as
  `val/acc` (in-distribution sets pooled), `val/acc/len{L}`, `val/acc/kv{K}`, `val/acc/len{L}_kv{K}`,
  `val/acc/length_test` and `val/acc/kv_test`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from ..data.sampling import IndexedBatchStream
from ..data.token_datamodule import TokenDataModule
from ..lm_module import IGNORE_INDEX, LanguageModelModule, attached_trainer

BLANK = 0
TRAIN_STREAM, EVAL_STREAM = 0, 1


# ----------------------------------------------------------------------------------------------- generator
def check_mqar(seq_len: int, num_kv_pairs: int, vocab_size: int, power_a: float = 0.01) -> None:
    """Raise ValueError, naming the problem, unless these settings make a valid MQAR sequence."""
    for name, value in (("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"MQAR: {name} must be a positive integer, got {value!r}")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(
            f"MQAR: num_kv_pairs={num_kv_pairs} does not fit in seq_len={seq_len}: the pairs take "
            f"2×{num_kv_pairs} tokens and the queries {num_kv_pairs} slots of 2 tokens after them, so seq_len must "
            f"be at least 4×num_kv_pairs = {4 * num_kv_pairs} (or use at most {seq_len // 4} pairs)"
        )
    n_keys, n_values = vocab_size // 2 - 1, vocab_size - vocab_size // 2
    if min(n_keys, n_values) < num_kv_pairs:
        raise ValueError(
            f"MQAR: vocab_size={vocab_size} is too small for {num_kv_pairs} distinct keys and values: keys come from "
            f"[1, {vocab_size // 2}) ({n_keys} tokens) and values from [{vocab_size // 2}, {vocab_size}) "
            f"({n_values}); vocab_size must be at least {2 * num_kv_pairs + 2}"
        )
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not math.isfinite(power_a) or power_a <= 0:
        raise ValueError(f"MQAR: power_a must be a finite positive number (Zoology uses 0.01), got {power_a!r}")


def query_slot_log_weights(num_slots: int, power_a: float) -> np.ndarray:
    """log of the unnormalised probability (g + 1)^(power_a − 1) of query slot g = 0 … num_slots − 1."""
    return (power_a - 1.0) * np.log(np.arange(1, num_slots + 1, dtype=np.float64))


def _distinct(rng: np.random.Generator, n: int, population: int, k: int, log_weights: np.ndarray | None = None):
    """(n, k) draws without replacement from range(population), in draw order.

    Uniform: the k smallest of iid uniforms are a uniform k-subset, shuffled into a uniform order.
    Weighted: Gumbel top-k, the k largest of log w + Gumbel noise in decreasing order, which is
    sequential sampling without replacement with probabilities ∝ w (Plackett–Luce).
    """
    if log_weights is None:
        scores = rng.random((n, population))
        chosen = np.argpartition(scores, k - 1, axis=1)[:, :k] if k < population else np.tile(np.arange(k), (n, 1))
        order = np.argsort(rng.random((n, k)), axis=1)
        return np.take_along_axis(chosen, order, axis=1)
    scores = log_weights[None, :] + rng.gumbel(size=(n, population))
    chosen = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < population else np.tile(np.arange(k), (n, 1))
    order = np.argsort(-np.take_along_axis(scores, chosen, axis=1), axis=1)
    return np.take_along_axis(chosen, order, axis=1)


def mqar_examples(
    rng: np.random.Generator,
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), both int64 of shape (num_examples, seq_len); see the module docstring."""
    check_mqar(seq_len, num_kv_pairs, vocab_size, power_a)
    n, K, L, V = int(num_examples), int(num_kv_pairs), int(seq_len), int(vocab_size)
    half = V // 2
    keys = 1 + _distinct(rng, n, half - 1, K)
    values = half + _distinct(rng, n, V - half, K)
    context = 2 * K
    slots = (L - context) // 2
    gaps = _distinct(rng, n, slots, K, query_slot_log_weights(slots, power_a))  # gaps[:, j]: slot of key j

    inputs = np.full((n, L), BLANK, dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    if random_non_queries:
        inputs[:, context:] = rng.integers(0, V, size=(n, L - context))
    query_pos = context + 2 * gaps
    rows = np.arange(n)[:, None]
    inputs[rows, query_pos] = keys
    labels = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    labels[rows, query_pos] = values
    return inputs, labels


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class MQARSetting:
    """One MQAR configuration. `weight` is its share of the training mixture (evaluation sets ignore it)."""

    seq_len: int
    num_kv_pairs: int
    weight: float = 1.0

    def __post_init__(self):
        check_mqar(self.seq_len, self.num_kv_pairs, vocab_size=2 * self.num_kv_pairs + 2)
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"MQARSetting.weight must be a finite positive number, got {self.weight!r}")

    @property
    def name(self) -> str:
        return f"len{self.seq_len}_kv{self.num_kv_pairs}"


def _settings(value, where: str) -> list[MQARSetting]:
    """Settings from config: MQARSetting, a dict of its fields, or a [seq_len, num_kv_pairs(, weight)] list."""
    out = []
    for i, item in enumerate(value or []):
        try:
            if isinstance(item, MQARSetting):
                out.append(item)
            elif isinstance(item, dict):
                out.append(MQARSetting(**item))
            elif isinstance(item, (list, tuple)) and 2 <= len(item) <= 3:
                out.append(MQARSetting(*item))
            else:
                raise ValueError(f"expected {{seq_len, num_kv_pairs}} or [seq_len, num_kv_pairs], got {item!r}")
        except (TypeError, ValueError) as err:
            raise ValueError(f"data.{where}[{i}]: {err}") from None
    return out


@dataclass(frozen=True)
class EvalSlice:
    """One evaluation set and the metric groups its answers count towards."""

    setting: MQARSetting
    groups: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ datasets
class MQARTrainStream(IndexedBatchStream):
    """Endless training batches; batch i is drawn from (seed, i) alone: its setting from the mixture, then
    `batch_size × world_size` examples of which this rank takes its slice."""

    def __init__(self, module: MQARDataModule, rank: int = 0, world_size: int = 1, start: int = 0, stop=None):
        super().__init__(rank=rank, world_size=world_size, start=start, stop=stop)
        self.m = module
        weights = np.array([s.weight for s in module.train_settings], dtype=np.float64)
        self.probs = weights / weights.sum()

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        m = self.m
        rng = np.random.default_rng([m.seed, TRAIN_STREAM, index])
        setting = m.train_settings[int(rng.choice(len(self.probs), p=self.probs))]
        inputs, labels = mqar_examples(
            rng,
            m.batch_size * self.world_size,
            setting.seq_len,
            setting.num_kv_pairs,
            m.vocab_size,
            m.power_a,
            m.random_non_queries,
        )
        part = self.rank_slice(m.batch_size)
        return {"input_ids": torch.from_numpy(inputs[part]), "labels": torch.from_numpy(labels[part])}


class MQAREvalBatches(Dataset):
    """The evaluation sets, one after another, in batches that never mix two sets. The examples of a set
    depend on (seed, seq_len, num_kv_pairs) only, not on the batch size or on which other sets exist."""

    def __init__(self, module: MQARDataModule, batch_size: int):
        self.slices = module.eval_slices
        self.batch_size = batch_size
        self.data = []
        for s in self.slices:
            rng = np.random.default_rng([module.seed, EVAL_STREAM, s.setting.seq_len, s.setting.num_kv_pairs])
            inputs, labels = mqar_examples(
                rng,
                module.num_val_examples,
                s.setting.seq_len,
                s.setting.num_kv_pairs,
                module.vocab_size,
                module.power_a,
                module.random_non_queries,
            )
            self.data.append((torch.from_numpy(inputs), torch.from_numpy(labels)))
        per_set = -(-module.num_val_examples // batch_size)
        self.index = [(i, b) for i in range(len(self.slices)) for b in range(per_set)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        which, b = self.index[i]
        inputs, labels = self.data[which]
        part = slice(b * self.batch_size, (b + 1) * self.batch_size)
        return {"input_ids": inputs[part], "labels": labels[part], "slice": which}


# -------------------------------------------------------------------------------------------- data module
class MQARDataModule(TokenDataModule):
    """MQAR batches for training and evaluation, made on the fly (no files).

    Args:
        train: the training mixture, settings {seq_len, num_kv_pairs, weight}; each training batch is drawn
            from one of them (chosen with probability ∝ weight), so a batch never mixes lengths.
        val: in-distribution evaluation sets (their pooled accuracy is `val/acc`); None = the training settings.
        length_test: sets for length extrapolation (longer than training), pooled as `val/acc/length_test`.
        kv_test: sets for kv-count extrapolation (more pairs than training), pooled as `val/acc/kv_test`.
        vocab_size: keys come from [1, V/2), values from [V/2, V) (Zoology uses 8192).
        power_a: query-slot power law, see the module docstring.
        random_non_queries: noise tokens (True, Zoology's default) or blanks between the queries.
        batch_size: training sequences per batch on each device.
        val_batch_size: evaluation batch size; None = batch_size.
        num_val_examples: sequences per evaluation set.
        seed: training batch i and every evaluation set are pure functions of the seed.

    Every evaluation set also counts towards `val/acc/len{L}` and `val/acc/kv{K}` (pooled over the sets of
    that length / kv count) and `val/acc/len{L}_kv{K}`. `seq_len`, linked into the model's `max_seq_len`,
    is the longest of all settings, so the model can be evaluated on every set.

    A `TokenDataModule` (what the CLI expects) whose tokens are generated rather than read: the resume
    bookkeeping and the loaders are the platform's; the batches are MQAR's.
    """

    def __init__(
        self,
        train: list[MQARSetting] | None = None,
        val: list[MQARSetting] | None = None,
        length_test: list[MQARSetting] | None = None,
        kv_test: list[MQARSetting] | None = None,
        vocab_size: int = 8192,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_val_examples: int = 256,
        seed: int = 1234,
        num_workers: int = 0,
    ):
        train_settings = _settings(train, "train") if train else [MQARSetting(64, 4), MQARSetting(64, 8)]
        val_settings = _settings(val, "val") if val is not None else list(train_settings)
        length_settings = _settings(length_test, "length_test")
        kv_settings = _settings(kv_test, "kv_test")
        for name, value in (("batch_size", batch_size), ("num_val_examples", num_val_examples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if val_batch_size is not None and (not isinstance(val_batch_size, int) or val_batch_size < 1):
            raise ValueError(f"data.val_batch_size must be a positive integer or None, got {val_batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"data.seed must be a non-negative integer, got {seed!r}")
        groups = (("train", train_settings), ("val", val_settings), ("length_test", length_settings))
        for where, group in (*groups, ("kv_test", kv_settings)):
            for i, s in enumerate(group):
                try:
                    check_mqar(s.seq_len, s.num_kv_pairs, vocab_size, power_a)
                except ValueError as err:
                    raise ValueError(f"data.{where}[{i}] ({s.name}): {err}") from None
        every = [*train_settings, *val_settings, *length_settings, *kv_settings]
        super().__init__(
            seq_len=max(s.seq_len for s in every),
            batch_size=batch_size,
            vocab_size=vocab_size,
            pad_vocab_multiple=1,
            val_fraction=0.0,
            seed=seed,
            num_workers=num_workers,
        )
        self.save_hyperparameters(logger=False)
        self.train_settings, self.val_settings = train_settings, val_settings
        self.length_test, self.kv_test = length_settings, kv_settings
        self.power_a = power_a
        self.random_non_queries = random_non_queries
        self.val_batch_size = val_batch_size or batch_size
        self.num_val_examples = num_val_examples
        self.eval_slices = self._eval_slices()
        self._eval_set: MQAREvalBatches | None = None  # not the base class's _val (token windows)

    # -- what the platform's TokenDataModule asks of a token source -------------------------------------
    def _tokenizer_vocab_size(self) -> int:
        return self.requested_vocab_size  # checked against every setting in __init__

    def _fingerprint(self) -> str:
        mixture = ",".join(f"{s.name}x{s.weight:g}" for s in self.train_settings)
        return f"mqar|{mixture}|V{self.requested_vocab_size}|a{self.power_a}|noise{int(self.random_non_queries)}"

    def setup(self, stage: str | None = None) -> None:
        pass  # nothing to load: batches are generated when asked for

    def _eval_slices(self) -> list[EvalSlice]:
        """Each distinct evaluation setting once, with every group it belongs to."""
        groups: dict[str, list[str]] = {}
        settings: dict[str, MQARSetting] = {}
        for pool, group in (("", self.val_settings), ("length_test", self.length_test), ("kv_test", self.kv_test)):
            for s in group:
                settings.setdefault(s.name, s)
                names = groups.setdefault(s.name, [s.name, f"len{s.seq_len}", f"kv{s.num_kv_pairs}"])
                if pool not in names:
                    names.append(pool)
        return [EvalSlice(settings[name], tuple(g)) for name, g in groups.items()]

    def metric_groups(self) -> list[str]:
        """Every group name an evaluation batch may count towards ("" is the in-distribution pool)."""
        seen: dict[str, None] = {}
        for s in self.eval_slices:
            seen.update(dict.fromkeys(s.groups))
        return list(seen)

    # -- loaders ------------------------------------------------------------------------------------
    def train_stream(self, start: int | None = None, stop: int | None = None) -> MQARTrainStream:
        rank, world = self._rank_world()
        return MQARTrainStream(self, rank=rank, world_size=world, start=self._stream_start(start), stop=stop)

    def eval_batches(self) -> MQAREvalBatches:
        if self._eval_set is None:
            self._eval_set = MQAREvalBatches(self, self.val_batch_size)
        return self._eval_set

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batches())

    def predict_dataloader(self) -> DataLoader:
        raise ValueError("MQAR has no prompts to continue: use fit, validate or test")


# ------------------------------------------------------------------------------------------------- module
class MQARModule(LanguageModelModule):
    """`LanguageModelModule` on MQAR: the same loss (on the answers only, the labels say so), plus answer
    accuracy per evaluation slice (torchmetrics, synced across devices), logged as `{stage}/acc` for the
    in-distribution sets and `{stage}/acc/<group>` for every other group (see `MQARDataModule`).

    The slices come from the DataModule when the trainer sets up, so the metrics exist before the first
    evaluation batch. Arguments: those of `LanguageModelModule`.
    """

    def setup(self, stage: str) -> None:
        super().setup(stage)
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "eval_slices"):
            raise ValueError(
                "MQARModule needs the MQARDataModule (data.class_path: parallax_lightning.long_context.MQARDataModule) "
                f"to know its evaluation slices; got {type(datamodule).__name__}"
            )
        self._slices = datamodule.eval_slices
        groups = datamodule.metric_groups()
        if set(getattr(self, "_group_keys", {})) != set(groups):
            self._group_keys = {g: f"g{i}" for i, g in enumerate(groups)}  # ModuleDict keys must be plain
            self.val_acc = nn.ModuleDict({k: self._accuracy() for k in self._group_keys.values()})
            self.test_acc = nn.ModuleDict({k: self._accuracy() for k in self._group_keys.values()})

    def _accuracy(self) -> MulticlassAccuracy:
        return MulticlassAccuracy(
            num_classes=self.model_config.vocab_size, average="micro", ignore_index=IGNORE_INDEX, validate_args=False
        )

    def run_name(self) -> str:
        return "mqar-" + super().run_name()

    def eval_step_metrics(self, batch: dict, logits: torch.Tensor, stage: str) -> None:
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        preds, target = logits.argmax(dim=-1)[mask], labels[mask]
        metrics = self.val_acc if stage == "val" else self.test_acc
        for group in self._slices[int(batch["slice"])].groups:
            metrics[self._group_keys[group]].update(preds, target)
        # Every group is logged at every step, updated or not: with several devices each rank then computes
        # (and syncs) the same metrics in the same order, even when a slice's batches all went to other ranks.
        for group, key in self._group_keys.items():
            name = f"{stage}/acc" + (f"/{group}" if group else "")
            self.log(name, metrics[key], on_step=False, on_epoch=True, prog_bar=not group)
