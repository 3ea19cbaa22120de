"""`python -m parallax_lightning {fit,validate,test,predict} --config FILE.yaml` — LightningCLI with
jsonargparse's omegaconf mode (`${...}` interpolation), the data's vocabulary size and sequence length linked
into the model, MLflow tracking by default, and the platform's callbacks under their own config keys.

Config layout (see experiments/quickstart.yaml):

    model:    class_path: parallax_lightning.LanguageModelModule (default) + init_args: model / optimizer / schedule
    data:     class_path: parallax_lightning.data.TextDataModule (default) or TokenShardDataModule + init_args
    trainer:  Lightning Trainer arguments; trainer.logger defaults to ParallaxMLFlowLogger (sqlite:///mlflow.db)
    checkpoint / speed / training_metrics / lr_monitor / diagnostics / loss_curves: ParallaxCheckpoint (a
              ModelCheckpoint), SpeedMonitor, TrainingMetrics, LRMonitor (Lightning's LearningRateMonitor:
              learning rate, momentum and weight decay per parameter group), ParallaxDiagnostics, LossCurves

Lightning's SaveConfigCallback is off (it asserts on loggers without a log folder, such as MLflow on
sqlite); the resolved config is logged to the MLflow run as `config.yaml` instead, and the flattened keys
whose value differs from the default as the run's parameters (with the decoder as built, `model.model.*`).

Safety and faults (SECURITY.md): `class_path` values are limited to the platform's and Lightning's components
(class_paths.TRUSTED_PREFIXES) unless `--allow_class_path PREFIX` (or $PARALLAX_ALLOW_CLASS_PATHS) widens them,
and plain-data values never become objects; credentials are redacted from what is stored (the run's parameters,
tags, config.yaml, checkpoints); checkpoints are written atomically and read weights-only
(`AtomicCheckpointIO`); SIGTERM/SIGINT save a checkpoint and exit with 128 + the signal number; a NaN/inf stop
exits with 3. `python -m parallax_lightning ui` (tracking_ui.py) starts the MLflow UI on 127.0.0.1; Ctrl+C,
SIGTERM or SIGHUP stop it together with the server's whole process group.

`--ckpt_path last` (fit, validate, test; cli_checks.py) means the `last.ckpt` of the most recently started run
of the config's MLflow experiment, in the config's tracking store, that has one, looked up where the config
writes checkpoints (`checkpoint.dirpath`, else <trainer.default_root_dir>/<experiment id>/<run id>/checkpoints);
`fit` then continues that run. With none, the command stops before a run is opened. A finished fit, validate or
test prints its run id, store and the command that opens the MLflow UI on it.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.fabric.plugins.io import CheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from . import class_paths, cli_checks
from .callbacks import (
    LossCurves,
    LRMonitor,
    ParallaxCheckpoint,
    ParallaxDiagnostics,
    SpeedMonitor,
    TrainingInterrupted,
    TrainingMetrics,
)
from .checkpoint_io import AtomicCheckpointIO, check_checkpoint_fits
from .data.token_datamodule import TokenDataModule
from .lm_module import LanguageModelModule, NonFiniteLossError
from .redaction import has_credentials, redact
from .tracking import (
    TAG_PREFIX,
    ParallaxMLFlowLogger,
    flatten_config,
    log_params,
    log_text,
    mlflow_loggers,
    run_info_from_checkpoint,
    same_store,
)
from .tracking_ui import ui_main

TRAINER_DEFAULTS = {
    "logger": {"class_path": "parallax_lightning.tracking.ParallaxMLFlowLogger"},
    "default_root_dir": "runs",
    # The training stream is endless (batch i is a function of the seed and i): training is measured in
    # steps, validation every `val_check_interval` batches.
    "check_val_every_n_epoch": None,
    "val_check_interval": 250,
    "log_every_n_steps": 10,
}


def _flat_params(dumped: str) -> dict[str, str]:
    # ckpt_path differs between a run and its resumption by nature; it is kept as a tag instead.
    config = yaml.safe_load(dumped) or {}
    return flatten_config({k: v for k, v in config.items() if k not in ("config", "ckpt_path")})


# Noise for this platform: the stream needs no workers (batches are cut from memory-mapped arrays), and
# an endless stream has no length by design.
_QUIET = (
    r".*does not have many workers.*",
    r".*Total length of .* across ranks is zero.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
)


class ParallaxCLI(LightningCLI):
    """LightningCLI with this platform's defaults; subclass it (or pass keyword arguments) to change them.

    Models may be any LanguageModelModule subclass and data any TokenDataModule subclass (`class_path`);
    extra callbacks go in `trainer.callbacks` as class_path/init_args entries. Class paths outside this
    platform's and Lightning's components need `--allow_class_path PREFIX` (see class_paths.py).
    """

    def __init__(self, args=None, run: bool = True, **kwargs):
        raw = sys.argv[1:] if args is None else args
        if isinstance(raw, (list, tuple)):
            self._args, extra = class_paths.split_allow_flags(list(raw))
            self._allowed = class_paths.allowed_prefixes(extra)
            class_paths.check_args(self._args, self._allowed)
        else:  # a dict or Namespace, from Python
            self._args, self._allowed = raw, class_paths.allowed_prefixes()
            tree = dict(raw) if not hasattr(raw, "as_dict") else raw.as_dict()
            class_paths.check_config_tree(tree, self._allowed, "args")
        kwargs.setdefault("model_class", LanguageModelModule)
        kwargs.setdefault("datamodule_class", TokenDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", None)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "parser_mode": "omegaconf",
                "prog": "python -m parallax_lightning",
                "description": "Parallax Lab: train and evaluate decoders (Parallax, softmax, ...) with MLflow "
                "tracking. Configs may name the platform's and Lightning's components only; "
                f"'{class_paths.FLAG} PREFIX' (or ${class_paths.ENV_VAR}) trusts more. "
                "'python -m parallax_lightning ui' starts the MLflow UI on 127.0.0.1.",
            },
        )
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        with class_paths.import_policy(self._allowed):
            super().__init__(args=args, run=run, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # The arguments without --allow_class_path (already applied), whether they came from sys.argv or args.
        if isinstance(self._args, list):
            self.config = parser.parse_args(self._args)
        else:
            super().parse_arguments(parser, self._args)
        # LightningCLI, right after this hook, would overwrite the model's config with the hyper-parameters
        # stored in a checkpoint named by ckpt_path, silently dropping what the command line says (e.g.
        # predict's max_new_tokens). Here the config you pass is the truth; the checkpoint only supplies the
        # state (a shape mismatch is reported by name). So the path is held back until before_instantiate_classes.
        self._held_ckpt_path = None
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") is not None:
            self._held_ckpt_path = self.config[subcommand]["ckpt_path"]
            self.config[subcommand]["ckpt_path"] = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Lightning builds one parser per subcommand, in the order of `subcommands()`, and hands each to this
        # hook; they are kept to read each subcommand's defaults (`subcommand_parser`).
        self.parsers_seen = [*getattr(self, "parsers_seen", []), parser]
        parser.set_defaults(
            {
                "model": {"class_path": "parallax_lightning.lm_module.LanguageModelModule"},
                "data": {"class_path": "parallax_lightning.data.TextDataModule"},
            }
        )
        parser.add_argument(
            "--torch_threads",
            type=int | None,
            default=None,
            help="intra-op CPU threads for torch (None: torch's default). Tiny CPU models run fastest on 1: "
            "their matmuls are too small to split, and on a shared machine extra threads spin-wait.",
        )
        parser.link_arguments("data.vocab_size", "model.init_args.model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.init_args.model.max_seq_len", apply_on="instantiate")
        self._argument_sections = {
            "checkpoint": ParallaxCheckpoint,
            "speed": SpeedMonitor,
            "training_metrics": TrainingMetrics,
            "lr_monitor": LRMonitor,
            "diagnostics": ParallaxDiagnostics,
            "loss_curves": LossCurves,
        }
        for key, cls in self._argument_sections.items():
            parser.add_lightning_class_args(cls, key)
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        parser.set_defaults(
            {
                "lr_monitor.logging_interval": "step",
                "lr_monitor.log_momentum": True,
                "lr_monitor.log_weight_decay": True,
            }
        )

    def before_instantiate_classes(self) -> None:
        if getattr(self, "_held_ckpt_path", None) is not None:
            self.config[self.subcommand]["ckpt_path"] = self._held_ckpt_path
        # What the parser resolved (shorthands expanded): nothing outside the trusted namespaces is built, and
        # no class from a value that is plain data (the logger's tags, a strategy's `object` arguments).
        config = self.config.as_dict()
        class_paths.check_tree(config, self._allowed, "the parsed config")
        section = config.get(self.subcommand, config) if self.subcommand else config
        class_paths.check_free_form(
            section,
            components={"model": self.model_class, "data": self.datamodule_class},
            arguments={"trainer": self.trainer_class, **getattr(self, "_argument_sections", {})},
            source="the parsed config",
        )
        trainer = section.get("trainer") or {}
        for key, value in (
            ("trainer.default_root_dir", trainer.get("default_root_dir")),
            ("checkpoint.dirpath", (section.get("checkpoint") or {}).get("dirpath")),
        ):
            if has_credentials(str(value or "")):
                raise class_paths.SecretInConfig(
                    f"{key} holds credentials ({redact(str(value))}): the folder's name is stored in the run's "
                    "parameters and in every checkpoint. Give the storage its credentials through its environment "
                    "variables (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) instead"
                )
        threads = self._config_value(self.config, "torch_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_threads must be a positive integer, got {threads}")
            torch.set_num_threads(threads)

    def subcommand_parser(self, subcommand: str) -> LightningArgumentParser:
        """The parser of one subcommand (the main parser when the CLI runs without subcommands)."""
        parsers = dict(zip(self.subcommands(), self.parsers_seen))
        return parsers[subcommand] if len(self.parsers_seen) > 1 else self.parser

    def _config_value(self, config, key: str, default=None):
        """A value of the running subcommand's section (or of the top level without a subcommand)."""
        return config.get(str(self.subcommand), config).get(key, default)

    def instantiate_trainer(self, **kwargs):
        if self.subcommand == "predict":
            kwargs.setdefault("logger", False)  # generating text is not an experiment worth a run
        trainer_config = self._config_value(self.config_init, "trainer", default={})
        if {**trainer_config, **kwargs}.get("enable_checkpointing") is False:
            # trainer.enable_checkpointing=false means no checkpoints: the `checkpoint` key's callback becomes an
            # inert one (Lightning refuses a ModelCheckpoint next to that flag).
            section = self.config_init.get(str(self.subcommand), self.config_init)
            if isinstance(section.get("checkpoint"), ParallaxCheckpoint):
                section["checkpoint"] = pl.Callback()
        if {**trainer_config, **kwargs}.get("logger") is False:
            # LearningRateMonitor refuses a trainer without a logger: with nothing to log to, it becomes inert.
            section = self.config_init.get(str(self.subcommand), self.config_init)
            if isinstance(section.get("lr_monitor"), LRMonitor):
                section["lr_monitor"] = pl.Callback()
        plugins = kwargs.get("plugins", trainer_config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())  # atomic writes, weights-only reads
        elif not any(isinstance(p, AtomicCheckpointIO) for p in plugins):
            warnings.warn(
                "trainer.plugins sets its own CheckpointIO: checkpoints are then written and loaded its way, "
                "not atomically and weights-only (see SECURITY.md)",
                stacklevel=2,
            )
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    # -- tracking ------------------------------------------------------------------------------------
    def _ckpt_path(self) -> str | None:
        path = self.config_init[self.subcommand].get("ckpt_path") if self.subcommand else None
        return str(path) if path else None

    def _prepare_run(self, resume: bool) -> None:
        """Name the run, continue the checkpoint's run when resuming, log parameters and the config."""
        loggers = mlflow_loggers(self.trainer)
        if not loggers:
            return
        logger = loggers[0]
        ckpt_path = self._ckpt_path()
        info = run_info_from_checkpoint(ckpt_path) if ckpt_path and Path(ckpt_path).exists() else None
        if resume and info and not isinstance(logger, ParallaxMLFlowLogger):
            # Lightning's MLFlowLogger takes its run only when built.
            warnings.warn(
                f"the checkpoint belongs to MLflow run {info['run_id']}: Lightning's MLFlowLogger continues it only "
                "when trainer.logger.init_args.run_id names it (ParallaxMLFlowLogger, the default, does so itself)",
                stacklevel=2,
            )
        elif resume and info and logger.requested_run_id is None:
            stored = info.get("tracking_uri")
            if same_store(stored, logger.tracking_uri):
                logger.continue_run(info["run_id"])
            else:
                warnings.warn(
                    f"the checkpoint's MLflow run {info['run_id']} is in {redact(stored)}, not in "
                    f"{redact(logger.tracking_uri)}: starting a new run",
                    stacklevel=2,
                )
        name = self.model.run_name() if hasattr(self.model, "run_name") else None
        if name and isinstance(logger, ParallaxMLFlowLogger):
            logger.set_run_name(name if self.subcommand == "fit" else f"{name}-{self.subcommand}")
        if rank_zero_only.rank != 0:
            return
        client, run_id = logger.experiment, logger.run_id
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        text = yaml.safe_dump(dumped[self.subcommand], default_flow_style=False, allow_unicode=True, sort_keys=False)
        text = redact(text)  # e.g. the logger's tracking_uri with a password: neither a parameter nor config.yaml
        # Parameters are the keys whose value differs from the default (config.yaml holds all of them), so the
        # run's page and comparisons show what was chosen, not the trainer's dozens of defaults.
        parser = self.subcommand_parser(self.subcommand)
        defaults = _flat_params(parser.dump(parser.get_defaults(), skip_none=False, skip_validation=True))
        params = {k: v for k, v in _flat_params(text).items() if defaults.get(k) != v}
        model_config = getattr(self.model, "model_config", None)
        if dataclasses.is_dataclass(model_config):  # the linked values, as the model was built
            params.update(flatten_config({"model": {"model": dataclasses.asdict(model_config)}}))
        if hasattr(self.model, "describe"):
            params.update(flatten_config({"model": self.model.describe()}))
        log_params(client, run_id, params)
        resumes = client.get_run(run_id).data.tags.get(TAG_PREFIX + "resumes")
        artifact = "config.yaml" if self.subcommand == "fit" and not resumes else f"config_{self.subcommand}"
        if resumes and self.subcommand == "fit":
            artifact = f"config_resume{resumes}.yaml"
        elif self.subcommand != "fit":
            artifact += ".yaml"
        log_text(logger, text, artifact)
        client.set_tag(run_id, TAG_PREFIX + "subcommand", self.subcommand)
        if ckpt_path:
            client.set_tag(run_id, TAG_PREFIX + "checkpoint", str(Path(ckpt_path).resolve()))
            if info and not resume:
                client.set_tag(run_id, TAG_PREFIX + "source_run_id", info["run_id"])

    def _resolve_last_checkpoint(self) -> None:
        """`--ckpt_path last` becomes the path of the latest run's last checkpoint (Lightning's own "last" looks
        only in the folder of the run about to start, which is new, and would train from scratch)."""
        if self._ckpt_path() != "last":
            return
        path, run_id = cli_checks.find_last_checkpoint(self.trainer, self.subcommand)
        for config in (self.config_init, self.config):
            config[self.subcommand]["ckpt_path"] = path
        if rank_zero_only.rank == 0:
            run = f" (MLflow run {run_id})" if run_id else ""
            print(f"parallax_lightning: --ckpt_path last = {path}{run}", file=sys.stderr)

    def _report_run(self) -> None:
        """Where the run just finished is, and how to look at it."""
        loggers = mlflow_loggers(self.trainer) if rank_zero_only.rank == 0 else []
        if not loggers or getattr(loggers[0], "started", True) is False:
            return  # a ParallaxMLFlowLogger that never opened its run (reading run_id would open one)
        logger = loggers[0]
        client = logger.experiment
        run_id, experiment_id = logger.run_id, logger.experiment_id
        if run_id is None:
            return
        name = client.get_experiment(experiment_id).name
        uri = redact(client.tracking_uri)
        if uri.startswith(("http://", "https://")):
            see = f"open {uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        else:
            store = shlex.quote(uri)
            see = f"open it with: python -m parallax_lightning ui --backend-store-uri {store}  (or: mlflow ui --backend-store-uri {store})"
        print(
            f"parallax_lightning: {self.subcommand} run {run_id} (experiment {name!r}) in {uri}; {see}", file=sys.stderr
        )

    def _check_before_run(self, stage: str) -> None:
        """Check what would otherwise fail only once training starts: trainer settings Lightning divides by,
        a missing checkpoint or one that does not fit the model, a sequence longer than the data, a vocabulary
        too small for a shard, a warmup longer than training. All of it fails here, before an MLflow run is
        opened or a finished run is continued (a failed start must not change a run's record)."""
        if stage == "fit":
            cli_checks.check_trainer_settings(self.trainer)
        self._resolve_last_checkpoint()
        ckpt_path = self._ckpt_path()
        if ckpt_path and cli_checks.is_local_file_path(ckpt_path):
            cli_checks.check_sharded_checkpoint_strategy(ckpt_path, self.trainer.strategy)
            checkpoint = check_checkpoint_fits(
                ckpt_path, self.model, strict=getattr(self.model, "strict_loading", True)
            )
            if stage == "fit" and checkpoint is not None:
                cli_checks.check_same_optimizer(ckpt_path, checkpoint, self.model)
        if stage == "predict":
            return
        if isinstance(self.datamodule, TokenDataModule):
            self.datamodule.setup(stage)
        if stage == "fit" and hasattr(self.model, "schedule_for"):
            self.model.schedule_for(self.trainer)

    def before_fit(self) -> None:
        self._check_before_run("fit")
        self._prepare_run(resume=True)

    def after_fit(self) -> None:
        self._report_run()

    def before_validate(self) -> None:
        self._check_before_run("validate")
        self._prepare_run(resume=False)

    def after_validate(self) -> None:
        self._report_run()

    def before_test(self) -> None:
        self._check_before_run("test")
        self._prepare_run(resume=False)

    def after_test(self) -> None:
        self._report_run()

    def before_predict(self) -> None:
        self._check_before_run("predict")

    def predict(self, model, datamodule=None, **kwargs):
        results = self.trainer.predict(model, datamodule=datamodule, **kwargs) or []
        if rank_zero_only.rank == 0:
            for r in results:
                if "completion" in r:
                    print(f"--- prompt {r['prompt_index']}: {r['prompt']!r}\n{r['prompt']}{r['completion']}")
                else:
                    print(f"--- prompt {r['prompt_index']}: {r['tokens']}")
        return results


def _tool_main(name: str, args: list[str]) -> int:
    """The subcommands that use a trained model (their modules import what they need on use)."""
    if name == "eval":
        from .evaluation import eval_main

        return eval_main(args)
    if name == "export":
        from .export import export_main

        return export_main(args)
    from .generate_cli import generate_main

    return generate_main(args)


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["ui"]:
        sys.exit(ui_main(argv[1:]))
    if argv[:1] in (["eval"], ["export"], ["generate"]):
        sys.exit(_tool_main(argv[0], argv[1:]))
    try:
        ParallaxCLI(args=args)
    except NonFiniteLossError as err:
        print(f"parallax_lightning: {err}", file=sys.stderr)
        sys.exit(3)
    except TrainingInterrupted as err:
        print(f"parallax_lightning: {err.message}", file=sys.stderr)
        sys.exit(err.code)
    except class_paths.ConfigRefused as err:
        print(f"parallax_lightning: {err}", file=sys.stderr)
        sys.exit(2)
