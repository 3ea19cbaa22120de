"""The config trust model, round two: a config that names only classes once trusted (torch's) or hides a
class in a value that is plain data (the logger's `tags: dict[str, Any]`) is refused before anything is
built; YAML aliases cannot blow a config up; credentials never reach checkpoints, MLflow or config.yaml."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from parallax_lightning import class_paths
from parallax_lightning.class_paths import ClassPathNotAllowed, ConfigRefused, ConfigTooLarge, SecretInConfig
from parallax_lightning.redaction import redact, secret_env_name

from .platform_utils import bare_argv, marker_module, mlflow_client, only_run, run_cli, tiny_config, working_dir

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


CORPUS_DOCS = 4  # the conftest corpus, shortened


@pytest.fixture
def builds_marker(tmp_path, monkeypatch):
    """A module whose class `Boom` writes a marker file when constructed (not when imported), trusted with
    --allow_class_path: whether a config can get it built is what is tested."""

    def source(marker):
        return (
            "import pathlib\n"
            "from lightning.pytorch.callbacks import Callback\n"
            "class Boom(Callback):\n"
            "    def __init__(self):\n"
            f"        pathlib.Path({str(marker)!r}).write_text('built')\n"
        )

    with marker_module(tmp_path, monkeypatch, "boom", "built", source) as made:
        yield made


def _shell(marker: Path) -> dict:
    """torch's SubprocessHandler runs its command when constructed: here `touch marker`."""
    return {
        "class_path": "torch.distributed.elastic.multiprocessing.subprocess_handler.SubprocessHandler",
        "init_args": {
            "entrypoint": "sh",
            "args": ["-c", f"touch {marker}"],
            "env": {},
            "stdout": None,
            "stderr": None,
            "local_rank_id": 0,
        },
    }


def _logger(**init_args) -> dict:
    return {"logger": {"class_path": "parallax_lightning.tracking.ParallaxMLFlowLogger", "init_args": init_args}}


def _no_store(folder: Path) -> bool:
    """No MLflow run was opened: tiny_config's store was never created."""
    return not (folder / "mlflow.db").exists()


# -- classes with side effects on construction ------------------------------------------------------------
@pytest.mark.parametrize(
    "where",
    ["logger tags (dict[str, Any])", "a callback", "the logger tags, with torch allowed"],
)
def test_a_torch_class_that_runs_a_command_is_never_built(tmp_path, corpus, where):
    marker = tmp_path / "shell.ran"
    if where == "a callback":
        trainer, extra, key = {"callbacks": [_shell(marker)]}, [], "trainer.callbacks[0].class_path"
    else:
        trainer = _logger(tags={"x": _shell(marker)})
        key = "trainer.logger.init_args.tags.x.class_path"
        extra = ["--allow_class_path", "torch"] if "allowed" in where else []
    config = tiny_config(tmp_path, corpus, trainer=trainer)
    with pytest.raises(ClassPathNotAllowed, match=key.replace(".", r"\.").replace("[", r"\[")) as info:
        run_cli(["fit", "--config", str(config), *extra], tmp_path)
    assert "SubprocessHandler" in str(info.value)
    assert not marker.exists() and _no_store(tmp_path)


@pytest.mark.parametrize(
    "trainer",
    [
        lambda m: _logger(tags={"payload": {"class_path": f"{m}.Boom"}}),  # inside dict[str, Any]
        lambda m: _logger(tags={"class_path": f"{m}.Boom"}),  # the dict[str, Any] value itself
        lambda m: {  # a strategy argument typed `object`
            "strategy": {
                "class_path": "lightning.pytorch.strategies.DDPStrategy",
                "init_args": {"ddp_comm_state": {"class_path": f"{m}.Boom"}},
            }
        },
        lambda m: (
            {"callbacks": [{"class_path": "lightning.pytorch.callbacks.LambdaCallback", "init_args": {}}]}
            | _logger(tags={"nested": [{"deeper": {"class_path": f"{m}.Boom"}}]})
        ),
    ],
    ids=["in tags", "as tags", "strategy object argument", "deep in tags"],
)
def test_a_class_path_in_a_free_form_value_is_refused_even_when_trusted(tmp_path, corpus, builds_marker, trainer):
    """Values typed Any / object / dict[str, Any] stay plain data, whatever class they name."""
    module, marker = builds_marker
    config = tiny_config(tmp_path, corpus, trainer=trainer(module))
    with pytest.raises(ClassPathNotAllowed, match=rf"'{module}\.Boom'.*plain data") as info:
        run_cli(["fit", "--config", str(config), "--allow_class_path", module], tmp_path)
    assert "key trainer." in str(info.value)
    assert not marker.exists() and _no_store(tmp_path)


def test_the_same_class_in_a_typed_field_is_built(tmp_path, corpus, builds_marker):
    """The counterpart: where the type names a class (trainer.callbacks), a trusted class is built."""
    module, marker = builds_marker
    config = tiny_config(tmp_path, corpus, trainer={"callbacks": [{"class_path": f"{module}.Boom"}]})
    from parallax_lightning.cli import ParallaxCLI

    with bare_argv(), working_dir(tmp_path):
        cli = ParallaxCLI(args=["--config", str(config), "--allow_class_path", module], run=False)
    assert any(type(c).__name__ == "Boom" for c in cli.trainer.callbacks)
    assert marker.read_text() == "built"


def test_main_refuses_with_exit_code_2_and_the_key_named(tmp_path, corpus, capsys):
    from parallax_lightning.cli import main

    marker = tmp_path / "shell.ran"
    config = tiny_config(tmp_path, corpus, trainer=_logger(tags={"x": _shell(marker)}))
    with bare_argv(), working_dir(tmp_path), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config)])
    assert info.value.code == 2
    assert "trainer.logger.init_args.tags.x.class_path" in capsys.readouterr().err
    assert not marker.exists() and _no_store(tmp_path)


@pytest.mark.parametrize(
    "class_path",
    [
        "torch.optim.SGD",
        "torch.utils.data.DataLoader",
        "torch.multiprocessing.Process",
        "torch._inductor.compile_worker.subproc_pool.SubprocPool",
        "lightning.pytorch.cli.LightningCLI",
        "lightning.fabric.Fabric",
        "parallax_lightning.cli.ParallaxCLI",
        "parallax_lightning.tracking.subprocess.Popen",
    ],
)
def test_only_the_platforms_components_are_trusted(class_path):
    assert not class_paths.is_allowed(class_path, class_paths.allowed_prefixes())


@pytest.mark.parametrize(
    "class_path",
    [
        "parallax_lightning.LanguageModelModule",
        "parallax_lightning.data.TokenShardDataModule",
        "parallax_lightning.long_context.MQARModule",
        "parallax_lightning.tracking.ParallaxMLFlowLogger",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.strategies.DDPStrategy",
        "lightning.pytorch.plugins.environments.SLURMEnvironment",
        "lightning.pytorch.profilers.SimpleProfiler",
    ],
)
def test_the_platforms_components_are_trusted(class_path):
    assert class_paths.is_allowed(class_path, class_paths.allowed_prefixes())


def test_every_shipped_config_passes_every_check_before_classes_are_built():
    """The checks that run after parsing (free-form values, credentials) on experiments/*.yaml."""
    from parallax_lightning.cli import ParallaxCLI

    class Checked(Exception):
        pass

    class Probe(ParallaxCLI):
        def instantiate_classes(self):
            raise Checked

    configs = sorted((REPO / "experiments").rglob("*.yaml"))
    assert len(configs) > 10
    with bare_argv():
        for path in configs:
            with pytest.raises(Checked):
                Probe(args=["fit", "--config", str(path)])


# -- YAML aliases -------------------------------------------------------------------------------------------
def _laughs(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\ntrainer:\n  max_steps: 1\nbomb: *a{levels}\n"


def test_a_billion_laughs_config_is_refused_without_being_expanded(tmp_path):
    """In a fresh interpreter with a time limit, so that a walker that expands aliases fails the test instead
    of hanging it; the refusal names the file."""
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(_laughs())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / ".shim"), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "parallax_lightning", "fit", "--config", str(bomb)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the config's aliases were expanded: the process did not finish")
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(bomb) in done.stderr and "anchors and aliases" in done.stderr
    assert _no_store(tmp_path)


def test_alias_expansion_is_counted_per_distinct_node():
    root = yaml.compose(_laughs(levels=3, width=3), Loader=yaml.SafeLoader)
    # a0..a3 and bomb as keys (5 scalars) + a0 = [lol] (2) + a1..a3 and bomb expanded + trainer section (4)
    a = [2]
    for _ in range(3):
        a.append(1 + 3 * a[-1])
    expected = 1 + 5 + a[0] + a[1] + a[2] + a[3] + a[3] + 4
    assert class_paths._expanded_nodes(root, "x") == expected
    with pytest.raises(ConfigTooLarge, match="more than 100 nodes"):
        class_paths._expanded_nodes(root, "x", limit=100)


@pytest.mark.parametrize("key", ["trainer.callbacks", "trainer.logger.init_args.tags"])
def test_aliases_in_a_command_line_value_are_bounded_too(tmp_path, corpus, key):
    config = tiny_config(tmp_path, corpus)
    levels = ["&a0 [lol]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = "[" + ", ".join(levels) + ", *a9]"
    if key.endswith("tags"):
        bomb = "{bomb: " + bomb + "}"
    with pytest.raises(ConfigTooLarge, match=rf"--{re.escape(key)} on the command line"):
        run_cli(["fit", "--config", str(config), f"--{key}={bomb}"], tmp_path)


def test_a_config_that_contains_itself_is_refused(tmp_path, corpus):
    config = tmp_path / "loop.yaml"
    config.write_text("trainer:\n  callbacks: &loop\n    - *loop\n")
    with pytest.raises(ConfigTooLarge, match="contains it"):
        run_cli(["fit", "--config", str(config)], tmp_path)


# -- secrets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri, clean",
    [
        ("http://user:password@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
        ("https://token@mlflow.example.org/", "https://***@mlflow.example.org/"),
        ("postgresql://u:p@ss@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://h/api?token=abc&experiment=3", "https://h/api?token=***&experiment=3"),
        ("https://h/x?user=a&password=b;api_key=c", "https://h/x?user=a&password=***;api_key=***"),
        ("s3://b/k?X-Amz-Credential=AK&X-Amz-Signature=zz", "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***"),
        ("sqlite:////home/a@b/mlflow.db", "sqlite:////home/a@b/mlflow.db"),
        ("runs/model@v2", "runs/model@v2"),
    ],
)
def test_redaction_strips_url_credentials_and_secret_query_values(uri, clean):
    assert redact(uri) == clean
    assert redact(clean) == clean


def _run_without_a_store(monkeypatch, cls) -> None:
    """The logger's run ids, without contacting the store."""
    monkeypatch.setattr(cls, "run_id", property(lambda self: "run1"))
    monkeypatch.setattr(cls, "experiment_id", property(lambda self: "7"))


def test_a_checkpoint_records_the_tracking_uri_without_credentials(monkeypatch):
    from parallax_lightning.tracking import ParallaxMLFlowLogger, checkpoint_run_info, same_store

    logger = ParallaxMLFlowLogger(tracking_uri="http://user:hunter2@127.0.0.1:1/?token=t0k", system_metrics=False)
    _run_without_a_store(monkeypatch, ParallaxMLFlowLogger)
    info = checkpoint_run_info(SimpleNamespace(loggers=[logger]))
    assert info == {"run_id": "run1", "experiment_id": "7", "tracking_uri": "http://***@127.0.0.1:1/?token=***"}
    # resuming compares credential-free forms: the same server with any credentials is the same store
    assert same_store(info["tracking_uri"], "http://user:hunter2@127.0.0.1:1/?token=t0k")
    assert same_store(info["tracking_uri"], "http://other:pw@127.0.0.1:1/?token=new")
    assert same_store("http://user:hunter2@127.0.0.1:1/?token=t0k", "http://user:x@127.0.0.1:1/?token=y")
    assert not same_store(info["tracking_uri"], "http://user:hunter2@127.0.0.2:1/?token=t0k")


def test_a_tracking_uri_from_the_environment_is_stored_without_credentials(monkeypatch):
    from parallax_lightning.tracking import ParallaxMLFlowLogger, checkpoint_run_info

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cret@mlflow.example.org")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    logger = ParallaxMLFlowLogger(system_metrics=False)
    _run_without_a_store(monkeypatch, ParallaxMLFlowLogger)
    assert checkpoint_run_info(SimpleNamespace(loggers=[logger]))["tracking_uri"] == "https://***@mlflow.example.org"


def test_a_run_stores_no_credentials(tmp_path, corpus):
    """Credentials in values the platform stores (the logger's tags, the run name) reach neither the
    checkpoints nor MLflow's parameters, tags and config.yaml; resuming still continues the same run."""
    secret = "hunter2"
    config = tiny_config(
        tmp_path,
        corpus,
        trainer={
            "max_steps": 3,
            **_logger(tags={"source": f"https://alice:{secret}@data.example.org/c?token={secret}"}),
        },
    )
    args = ["fit", "--config", str(config)]
    run_cli([*args, f"--trainer.logger.init_args.run_name=run?token={secret}"], tmp_path)
    client = mlflow_client(tmp_path)
    run = only_run(client, "tests")
    stored = json.dumps(run.data.params) + json.dumps(run.data.tags)
    text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert secret not in stored and secret not in text, "a credential reached MLflow"
    assert "alice:" not in stored and "***@data.example.org" in stored
    checkpoints = sorted((tmp_path / "runs").rglob("*.ckpt"))
    assert checkpoints
    for path in checkpoints:
        assert secret.encode() not in path.read_bytes()
        assert torch.load(path, weights_only=True, map_location="cpu")["mlflow"]["run_id"] == run.info.run_id
    last = next(p for p in checkpoints if p.name == "last.ckpt")
    run_cli([*args, "--trainer.max_steps=6", f"--ckpt_path={last}"], tmp_path)
    assert only_run(client, "tests").info.run_id == run.info.run_id


@pytest.mark.parametrize(
    "name",
    ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASS", "API_AUTH"],
)
def test_a_secret_environment_variable_cannot_be_interpolated(tmp_path, corpus, monkeypatch, name):
    monkeypatch.setenv(name, "hunter2")
    config = tiny_config(tmp_path, corpus, trainer=_logger(run_name=f"run-${{oc.env:{name}}}"))
    with pytest.raises(SecretInConfig, match=rf"key trainer\.logger\.init_args\.run_name in .*\({name}\)"):
        run_cli(["fit", "--config", str(config)], tmp_path)
    assert _no_store(tmp_path)


@pytest.mark.parametrize(
    "arg",
    [
        "--trainer.logger.init_args.run_name=${oc.env:MLFLOW_TRACKING_PASSWORD}",
        "--trainer.logger.init_args.tags={'k': '${oc.env: GITHUB_TOKEN,none}'}",
        "--trainer.logger.init_args.run_name=${oc.env:${model.init_args.model.attention}}",
    ],
)
def test_secret_interpolation_on_the_command_line_is_refused(tmp_path, corpus, arg):
    config = tiny_config(tmp_path, corpus)
    with pytest.raises(SecretInConfig, match="on the command line"):
        run_cli(["fit", "--config", str(config), arg], tmp_path)
    assert _no_store(tmp_path)


def test_other_environment_variables_still_interpolate(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("PARALLAX_TEST_EXPERIMENT", "from-env")
    assert not secret_env_name("PARALLAX_TEST_EXPERIMENT") and not secret_env_name("PWD")
    config = tiny_config(tmp_path, corpus, trainer=_logger(experiment_name="${oc.env:PARALLAX_TEST_EXPERIMENT}"))
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(config), "--print_config"], tmp_path)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["init_args"]["experiment_name"] == "from-env"


@pytest.mark.parametrize("how", ["--trainer FILE", "trainer: FILE in a config"])
def test_a_section_read_from_another_file_is_checked_like_the_config(tmp_path, corpus, monkeypatch, how):
    """jsonargparse reads a section from a file named in its place: that file gets the same checks."""
    monkeypatch.setenv("MY_TOKEN", "hunter2")
    marker = tmp_path / "shell.ran"
    section = tmp_path / "sections" / "trainer.yaml"
    section.parent.mkdir()
    for content, error, named in [
        ({"callbacks": [_shell(marker)]}, ClassPathNotAllowed, "SubprocessHandler"),
        (_logger(run_name="${oc.env:MY_TOKEN}"), SecretInConfig, "MY_TOKEN"),
    ]:
        section.write_text(yaml.safe_dump(content))
        config = tiny_config(tmp_path, corpus)
        if how == "--trainer FILE":
            args = ["fit", "--config", str(config), "--trainer", str(section)]
        else:
            outer = tmp_path / "outer.yaml"
            outer.write_text("trainer: sections/trainer.yaml\n")
            args = ["fit", "--config", str(config), "--config", str(outer)]
        with pytest.raises(error, match=named) as info:
            run_cli(args, tmp_path)
        assert str(section) in str(info.value)
    assert not marker.exists() and _no_store(tmp_path)


@pytest.mark.parametrize("key", ["default_root_dir", "checkpoint"])
def test_credentials_in_the_output_folder_are_refused(tmp_path, corpus, key):
    folder = "s3://AKIAEXAMPLE:hunter2@bucket/runs"
    sections = (
        {"trainer": {"default_root_dir": folder}} if key == "default_root_dir" else {"checkpoint": {"dirpath": folder}}
    )
    config = tiny_config(tmp_path, corpus, **sections)
    with pytest.raises(SecretInConfig, match=r"holds credentials \(s3://\*\*\*@bucket/runs\)") as info:
        run_cli(["fit", "--config", str(config)], tmp_path)
    assert "hunter2" not in str(info.value) and _no_store(tmp_path)


def test_every_refusal_is_a_config_refusal():
    for cls in (ClassPathNotAllowed, SecretInConfig, ConfigTooLarge):
        assert issubclass(cls, ConfigRefused) and issubclass(cls, ValueError)
