"""LanguageModelModule: trains the Decoder on next-token prediction.

Batches are {"input_ids": (B, T), "labels": (B, T)}; a label of -100 carries no loss (tasks such as
associative recall mark every position but the answers that way and reuse this module as is). Logs
train/loss and train/ppl every step, val/loss and val/ppl (torchmetrics, token-weighted, synced across
devices); the CLI's callbacks add learning rates, weight decay, gradient norm, tokens and throughput. A
non-finite loss or gradient either stops training (`nonfinite="stop"`, the default) with the step, the first
parameter whose gradient is non-finite and the checkpoints named, or skips that optimizer step (`nonfinite="skip"`: the update is dropped, the weights
and optimizer state stay as they were, `train/nonfinite_skips` counts them); the module's `configure_callbacks`
adds that guard (`nonfinite.NonFiniteGuard`) to every trainer it runs in.

Subclasses (long-context tasks, reliability tests) override `compute_loss`, `eval_step_metrics`, or the
usual Lightning hooks; the optimizer, schedule, NaN guard and checkpoint bookkeeping come along.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from .model import Decoder, DecoderConfig
from .model_sizes import count_params, flops_per_token
from .nonfinite import NONFINITE_MODES, NonFiniteGuard, NonFiniteLossError, NonFiniteMode  # noqa: F401 - re-exported
from .optim import OptimizerConfig, Schedule, ScheduleConfig, ScheduledLR, build_optimizer, muon_groups
from .strategies import data_parallel_mesh, mixed_precision_policy, shard_decoder

IGNORE_INDEX = -100


def _flattens_weights(strategy) -> bool:
    """Lightning's FSDP (FSDP1) strategy, whose flat 1-D shards hide the matrices; not FSDP2 (ModelParallel)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return "fsdp" in type(strategy).__name__.lower() and not isinstance(strategy, ModelParallelStrategy)


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The module's trainer, or None before it is attached to one."""
    try:
        return module.trainer
    except RuntimeError:  # Lightning's answer for a module outside a Trainer
        return None


def _as_config(cls, value):
    """Dataclass configs arrive as instances (CLI, Python) or plain dicts (checkpoint hyper-parameters)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")


class LanguageModelModule(pl.LightningModule):
    """Next-token language model around `Decoder(model)`.

    Args:
        model: the decoder's configuration (`vocab_size` and `max_seq_len` are linked from the data by the CLI).
        optimizer: Muon (with AdamW for embeddings/head/norms) or AdamW, see OptimizerConfig.
        schedule: cosine / WSD / constant learning rate with optional weight-decay annealing, see ScheduleConfig.
        compile: torch.compile the decoder in place, as one graph (checkpoints keep the plain parameter names, so
            a run resumes with compile on or off). None (default) = on when training on CUDA, off on CPU, where
            compiling a small model costs more time than it saves. Generation with the KV cache runs eagerly.
            The first training step's time, compilation included, is logged as perf/compile_s (SpeedMonitor).
        max_new_tokens, temperature, top_k: how `predict` continues prompts.
        nonfinite: what a NaN/inf training loss or gradient does: "stop" (save the state before the step and
            exit with status 3) or "skip" (drop that optimizer step and go on).
        max_nonfinite_skips: with "skip", stop anyway after this many consecutive skipped steps (the run is
            then diverging, not hitting a rare bad batch).
    """

    def __init__(
        self,
        model: DecoderConfig = DecoderConfig(),  # noqa: B008 - dataclass defaults are what jsonargparse shows
        optimizer: OptimizerConfig = OptimizerConfig(),  # noqa: B008
        schedule: ScheduleConfig = ScheduleConfig(),  # noqa: B008
        compile: bool | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        nonfinite: NonFiniteMode = "stop",
        max_nonfinite_skips: int = 10,
    ):
        super().__init__()
        self.nonfinite_guard = NonFiniteGuard(nonfinite, max_nonfinite_skips)  # checks both values
        if compile is not None and not isinstance(compile, bool):
            raise ValueError(f"compile must be true, false or null (auto: on CUDA only), got {compile!r}")
        self.model_config = _as_config(DecoderConfig, model)
        self.optimizer_config = _as_config(OptimizerConfig, optimizer)
        self.schedule_config = _as_config(ScheduleConfig, schedule)
        self.save_hyperparameters(logger=False)
        # Plain dicts in hparams keep checkpoints loadable with torch.load(weights_only=True).
        for key, value in list(self.hparams.items()):
            if dataclasses.is_dataclass(value):
                self.hparams[key] = dataclasses.asdict(value)
        self.model = Decoder(self.model_config)
        if self.optimizer_config.name == "muon" and self.model_config.fused_qkvr:
            muon_groups(self.model, self.optimizer_config)  # a routing the fused weight cannot follow fails here
        self.compile_model = compile
        self._compiled = False
        self._sharded = False
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_loss = MeanMetric()
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.nonfinite = nonfinite
        self.max_nonfinite_skips = max_nonfinite_skips

    # -- description ---------------------------------------------------------------------------------
    def run_name(self) -> str:
        """Model, attention and optimizer, e.g. 'parallax-muon-d128x2'."""
        c = self.model_config
        window = f"-w{c.window_size}" if c.window_size else ""
        return f"{c.attention}{window}-{self.optimizer_config.name}-d{c.d_model}x{c.n_layers}"

    def describe(self) -> dict[str, Any]:
        """Numbers worth recording with the run (parameter counts)."""
        return {
            "params_total": count_params(self.model, exclude_embeddings=False),
            "params_non_embedding": count_params(self.model, exclude_embeddings=True),
        }

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token at this sequence length (attention counted by hand), for MFU."""
        return flops_per_token(self.model_config, int(seq_len or self.model_config.max_seq_len))

    # -- model ---------------------------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        """Whether the decoder has been compiled (in place, by `configure_model`)."""
        return self._compiled

    def _compile_wanted(self) -> bool:
        if self.compile_model is not None:
            return self.compile_model
        if attached_trainer(self) is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    @property
    def sharded(self) -> bool:
        """Whether the decoder's weights are sharded with FSDP2 (by `configure_model` under a
        ModelParallelStrategy, see parallax_lightning.strategies)."""
        return self._sharded

    def configure_model(self) -> None:
        if self._sharded:
            return
        strategy = self.trainer.strategy if attached_trainer(self) is not None else None
        mesh = data_parallel_mesh(strategy)
        if mesh is not None:
            compile_blocks = not self._compiled and self._compile_wanted()
            shard_decoder(
                self.model,
                mesh,
                mp_policy=mixed_precision_policy(strategy, strategy.root_device),
                reshard_after_forward=getattr(strategy, "reshard_after_forward", True),
                compile_blocks=compile_blocks,
            )
            self._sharded = True
            self._compiled = self._compiled or compile_blocks
            return
        if not self._compiled and self._compile_wanted():
            self.model.compile()
            self._compiled = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss over labelled tokens, logits, number of labelled tokens)."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        logits = self(input_ids)
        # fp32 cross-entropy: bf16 logits lose the small probabilities the loss is made of.
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        n_tokens = (labels != IGNORE_INDEX).sum()
        return loss, logits, n_tokens

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.compute_loss(batch)
        bs = batch["input_ids"].shape[0]
        # Data-parallel: the logged loss is the mean over every rank's batch (the global batch), so a run on N
        # devices logs the curve one device would log at the same global batch, not rank 0's share of it.
        sync = self.trainer.world_size > 1
        mean = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean") if sync else loss.detach()
        if not torch.isfinite(mean):  # NonFiniteGuard stops here or drops this step: its loss is no data point
            return loss
        self.log("train/loss", mean, on_step=True, on_epoch=False, prog_bar=True, batch_size=bs)
        self.log("train/ppl", mean.exp(), on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def configure_callbacks(self):
        # The guard travels with the module (config keys model.nonfinite / model.max_nonfinite_skips).
        return [self.nonfinite_guard]

    def schedule_for(self, trainer: pl.Trainer) -> Schedule:
        """The schedule over this training (checked by the CLI before a run starts, so a bad one fails early)."""
        total = self.schedule_config.total_steps or trainer.max_steps
        if total is None or total < 1:
            raise ValueError(
                "the learning-rate schedule needs the length of training: set trainer.max_steps "
                "(or model.schedule.total_steps)"
            )
        return Schedule(self.schedule_config, total)

    def configure_optimizers(self):
        if self.optimizer_config.name == "muon" and _flattens_weights(self.trainer.strategy):
            raise ValueError(
                "optimizer.name='muon' cannot run under Lightning's FSDP strategy: it flattens every weight into "
                "1-D shards, so Muon would see no matrices to orthogonalize. Use strategy=ddp with Muon, "
                "parallax_lightning.strategies.FSDP2Strategy (FSDP2 keeps the matrices), or AdamW with FSDP"
            )
        optimizer = build_optimizer(self.model, self.optimizer_config, verbose=self.trainer.global_rank == 0)
        scheduler = ScheduledLR(optimizer, self.schedule_for(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ----------------------------------------------------------------------------------
    def eval_step_metrics(self, batch: dict, logits: torch.Tensor, stage: str) -> None:
        """Hook for subclasses: extra metrics on an evaluation batch (logits already computed)."""

    def _eval_step(self, batch: dict, stage: str) -> torch.Tensor:
        loss, logits, n_tokens = self.compute_loss(batch)
        mean, ppl = (self.val_loss, self.val_ppl) if stage == "val" else (self.test_loss, self.test_ppl)
        mean.update(loss.detach(), weight=n_tokens)
        ppl.update(logits.float(), batch["labels"])
        bs = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", mean, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=bs)
        self.log(f"{stage}/ppl", ppl, on_step=False, on_epoch=True, batch_size=bs)
        self.eval_step_metrics(batch, logits, stage)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Continue one prompt; returns its index, the new token ids and (with a tokenizer) the text."""
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = datamodule.get_tokenizer() if datamodule is not None else None
        prompt = batch["input_ids"]
        room = self.model_config.max_seq_len - prompt.shape[1]
        if room < 1:
            raise ValueError(
                f"predict prompt {batch.get('prompt_index', batch_idx)} has {prompt.shape[1]} tokens; the model "
                f"takes at most max_seq_len={self.model_config.max_seq_len}"
            )
        max_new = min(self.hparams.max_new_tokens, room)
        if max_new < self.hparams.max_new_tokens:
            warnings.warn(
                f"generating {max_new} tokens, not {self.hparams.max_new_tokens}: max_seq_len is reached", stacklevel=2
            )
        out = self.model.generate(
            prompt,
            max_new_tokens=max_new,
            temperature=self.hparams.temperature,
            top_k=self.hparams.top_k,
            eos_id=getattr(tokenizer, "eos_id", None),
        )
        new = out[0, prompt.shape[1] :].tolist()
        result = {"prompt_index": int(batch.get("prompt_index", batch_idx)), "tokens": new}
        if tokenizer is not None:
            result["prompt"] = tokenizer.decode(prompt[0].tolist())
            result["completion"] = tokenizer.decode(new)
        return result

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from .redaction import redact_tree
        from .tracking import checkpoint_run_info

        info = checkpoint_run_info(self.trainer)
        if info:
            checkpoint["mlflow"] = info
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):  # e.g. a data URL with a token
            if key in checkpoint:
                checkpoint[key] = redact_tree(checkpoint[key])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_projection_layout(checkpoint)

    def _check_projection_layout(self, checkpoint: dict) -> None:
        """The weights load into either projection layout (the attention converts them), but the optimizer
        state of one layout cannot be restored into the other: refuse resuming training across them by name."""
        trainer = attached_trainer(self)
        if trainer is None or not trainer.training or "optimizer_states" not in checkpoint:
            return
        saved_fused = any(k.endswith("qrkv_proj.weight") for k in checkpoint.get("state_dict", {}))
        if saved_fused != self.model_config.fused_qkvr:
            raise ValueError(
                f"the checkpoint was trained with model.model.fused_qkvr={str(saved_fused).lower()}, this run sets "
                f"{str(self.model_config.fused_qkvr).lower()}: its optimizer state cannot be resumed in the other "
                "projection layout. Resume with the checkpoint's setting (the weights alone load into either "
                "layout, e.g. LanguageModelModule.load_from_checkpoint)"
            )
