"""Nothing runs that the user did not ask for: configs may only name trusted classes unless the user widens
the list on the command line, checkpoints are loaded as data only, every torch.load in the code base says
weights_only=True, and the MLflow UI helper binds to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from parallax_lightning import class_paths
from parallax_lightning.checkpoint_io import AtomicCheckpointIO
from parallax_lightning.class_paths import ClassPathNotAllowed
from parallax_lightning.tracking import run_info_from_checkpoint
from parallax_lightning.tracking_ui import exposure_warning, ui_command

from .platform_utils import marker_module, run_cli, tiny_config

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


CORPUS_DOCS = 4  # the conftest corpus, shortened


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when imported; returns (module name, marker)."""

    def source(marker):
        return (
            "import pathlib\n"
            "from lightning.pytorch.callbacks import Callback\n"
            f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
            "class Payload(Callback):\n"
            "    pass\n"
        )

    with marker_module(tmp_path, monkeypatch, "evil", "ran", source) as made:
        yield made


def _callback(module: str) -> dict:
    return {"callbacks": [{"class_path": f"{module}.Payload"}]}


# -- class_path ---------------------------------------------------------------------------------------------
def test_untrusted_class_path_in_a_config_is_refused_before_it_is_imported(tmp_path, corpus, evil):
    module, marker = evil
    config = tiny_config(tmp_path, corpus, trainer=_callback(module))
    with pytest.raises(
        ClassPathNotAllowed, match=rf"'{module}\.Payload' \(key trainer\.callbacks\[0\]\.class_path"
    ) as info:
        run_cli(["fit", "--config", str(config)], tmp_path)
    assert str(config) in str(info.value) and f"--allow_class_path {module}" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "arg",
    [
        "--trainer.logger={m}.Payload",
        "--trainer.callbacks+={m}.Payload",
        '--trainer.callbacks=[{{"class_path": "{m}.Payload"}}]',
    ],
)
def test_untrusted_class_path_on_the_command_line_is_refused(tmp_path, corpus, evil, arg):
    module, marker = evil
    config = tiny_config(tmp_path, corpus)
    with pytest.raises(ClassPathNotAllowed, match=rf"'{module}\.Payload'"):
        run_cli(["fit", "--config", str(config), arg.format(m=module)], tmp_path)
    assert not marker.exists()


def test_the_allow_flag_and_the_environment_trust_a_prefix(tmp_path, corpus, evil, monkeypatch, capsys):
    module, marker = evil
    config = tiny_config(tmp_path, corpus, trainer=_callback(module))
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(config), f"--allow_class_path={module}", "--print_config"], tmp_path)
    assert info.value.code in (0, None) and marker.read_text() == "imported"
    assert f"{module}.Payload" in capsys.readouterr().out
    monkeypatch.setenv(class_paths.ENV_VAR, f"other,{module}")
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(config), "--print_config"], tmp_path)
    assert info.value.code in (0, None)


def test_a_config_cannot_widen_the_trusted_namespaces(tmp_path, corpus, evil):
    module, _ = evil
    config = tiny_config(tmp_path, corpus, allow_class_path=module)
    with pytest.raises(ClassPathNotAllowed, match="only accepted on the command line"):
        run_cli(["fit", "--config", str(config)], tmp_path)


@pytest.mark.parametrize("prefix", ["*", "jsonargparse", "not a module", ""])
def test_the_allow_flag_takes_module_prefixes_only(prefix):
    with pytest.raises(ValueError, match=re.escape(repr(prefix)) if prefix else "needs a value"):
        class_paths.split_allow_flags(["fit", "--allow_class_path", prefix] if prefix else ["--allow_class_path"])


def test_the_parser_itself_denies_untrusted_imports_while_the_cli_runs(evil):
    """The second line of defence: jsonargparse's import-path policy, set for the CLI's lifetime only."""
    from jsonargparse import _common
    from jsonargparse._util import import_object

    module, marker = evil
    before = dict(_common.parsing_settings["import_path_verdicts"])
    with class_paths.import_policy(class_paths.allowed_prefixes()):
        with pytest.raises(Exception, match=rf"Importing '{module}\.Payload' is not allowed"):
            import_object(f"{module}.Payload")
        # a trusted prefix does not open the door to what it imports (os.system is defined in posix)
        with pytest.raises(Exception, match="is not allowed"):
            import_object("parallax_lightning.cli.os.system")
        assert import_object("parallax_lightning.LanguageModelModule").__name__ == "LanguageModelModule"
    assert not marker.exists()
    assert _common.parsing_settings["import_path_verdicts"] == before


def test_the_parser_never_instantiates_class_paths_in_values_typed_any_while_the_cli_runs():
    from jsonargparse import _common

    before = _common.parsing_settings["instantiate_subclass_spec_in_any"]
    with class_paths.import_policy(class_paths.allowed_prefixes()):
        assert _common.parsing_settings["instantiate_subclass_spec_in_any"] is False
        assert _common.parsing_settings["import_paths_enforced"] is True
    assert _common.parsing_settings["instantiate_subclass_spec_in_any"] == before


def test_the_jsonargparse_settings_import_policy_restores_are_where_it_reads_them():
    """import_policy restores jsonargparse's settings through its (private) settings table, which has no
    public getter: this fails when a jsonargparse release moves them, so the adapter gets updated."""
    snapshot = class_paths._settings_snapshot()
    assert snapshot is not None and set(snapshot) == set(class_paths._POLICY_SETTINGS)
    assert isinstance(snapshot["import_path_verdicts"], dict)


def test_every_shipped_config_names_trusted_classes_only():
    configs = [p for p in (REPO / "experiments").rglob("*.yaml")]
    assert configs
    for path in configs:
        class_paths._check_yaml(path.read_text(), class_paths.TRUSTED_PREFIXES, str(path))


# -- checkpoints --------------------------------------------------------------------------------------------
class _RunsCode:
    """Pickles to a call of Path.write_text: loading it with weights_only=False would run that call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil_ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "mlflow": {"run_id": "x"}, "payload": _RunsCode(marker)}, evil_ckpt)
    named = rf"checkpoint '{re.escape(str(evil_ckpt))}' holds Python objects other than tensors"
    with pytest.raises(ValueError, match=named):
        run_info_from_checkpoint(evil_ckpt)
    with pytest.raises(ValueError, match=named):
        AtomicCheckpointIO().load_checkpoint(evil_ckpt)  # what Lightning's restore calls under the CLI
    with pytest.raises(ValueError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(evil_ckpt, weights_only=False)
    # (The CLI reads --ckpt_path through these two: test_faults checks it restores through the IO.)
    assert not marker.exists()


def test_every_torch_load_in_the_code_base_is_weights_only():
    """An audit, kept true by this test: each torch.load call passes weights_only=True."""
    offenders = []
    for folder in ("parallax_lightning", "kernels", "parallax_muon", "experiments", "benchmarks", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"torch\.load\(", text):
                depth, end = 1, match.end()
                while depth and end < len(text):
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    end += 1
                if "weights_only=True" not in text[match.start() : end]:
                    offenders.append(f"{path.relative_to(REPO)}:{text[: match.start()].count(chr(10)) + 1}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


# -- the MLflow UI ------------------------------------------------------------------------------------------
def test_ui_binds_to_loopback_unless_told_and_warns_when_exposed(tmp_path, monkeypatch, capsys):
    cmd = ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warning(host) is None
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        assert "anyone who can reach" in exposure_warning(host)
    with pytest.raises(ValueError, match=r"port must be in 1\.\.65535, got 70000"):
        ui_command(port=70000)

    launched = []

    class FakePopen:
        pid = 0

        def __init__(self, cmd, **kwargs):
            launched.append(cmd)

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr("parallax_lightning.tracking_ui.subprocess.Popen", FakePopen)
    # No real server group exists to stop; the fake's pid must never reach os.killpg.
    monkeypatch.setattr("parallax_lightning.tracking_ui.stop_process_group", lambda proc, timeout=20.0: proc.wait())
    from parallax_lightning.cli import main

    with pytest.raises(SystemExit) as info:
        main(["ui", "--host", "0.0.0.0", "--port", "5123"])
    assert info.value.code == 0
    assert launched[-1][launched[-1].index("--host") + 1] == "0.0.0.0"
    assert "WARNING: the MLflow UI will listen on 0.0.0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ui"])
    assert launched[-1][launched[-1].index("--host") + 1] == "127.0.0.1"
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize("pid", [0, 1, "own group"])
def test_stopping_the_ui_never_signals_its_own_process_group(pid, monkeypatch):
    """A pid of 0 (or this process's group) given to os.killpg would signal the shell that started us."""
    import os

    from parallax_lightning.tracking_ui import stop_process_group

    class Proc:
        def __init__(self):
            self.pid = os.getpgrp() if pid == "own group" else pid
            self.waited = False

        def wait(self):
            self.waited = True
            return 0

        def poll(self):
            return 0

    def killpg(*args):
        raise AssertionError(f"os.killpg{args} was called")

    monkeypatch.setattr("parallax_lightning.tracking_ui.os.killpg", killpg)
    proc = Proc()
    stop_process_group(proc)
    assert proc.waited


def test_jsonargparse_settings_are_read_only_from_the_tested_versions(monkeypatch):
    """Outside JSONARGPARSE_TESTED the private table is not read: the policy stays on, with one warning."""
    import importlib.metadata

    installed = importlib.metadata.version("jsonargparse")
    assert class_paths._jsonargparse_tested(installed)  # the installed one is a tested one
    monkeypatch.setattr(class_paths, "_untested_warned", [])
    with pytest.warns(UserWarning, match=r"jsonargparse 99\.0 is outside .* stays applied"):
        assert not class_paths._jsonargparse_tested("99.0")
    with pytest.warns(UserWarning, match=r"jsonargparse 4\.0 is outside"):
        assert not class_paths._jsonargparse_tested("4.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not class_paths._jsonargparse_tested("99.0")  # one warning per version and process
