"""`export` / `load_pretrained`: a checkpoint's decoder as config.json + model.safetensors + tokenizer, loaded
back with bit-identical logits; bad checkpoints and folders are named errors; loading runs no code."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from parallax_lightning.data.tokenizers import ByteTokenizer, HFTokenizer, train_byte_bpe
from parallax_lightning.export import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    export_main,
    export_pretrained,
    load_model,
    load_pretrained,
    load_pretrained_tokenizer,
)

from .checkpoint_utils import save_checkpoint, tiny_decoder


@pytest.mark.parametrize("overrides", [{}, {"attention": "softmax", "tie_embeddings": False}, {"window_size": 5}])
def test_export_round_trip_gives_bit_identical_logits(tmp_path, overrides):
    model = tiny_decoder(**overrides)
    ckpt = save_checkpoint(model, tmp_path / "last.ckpt")
    out = export_pretrained(ckpt, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model_type"] == "parallax_decoder" and config["tokenizer"] == "byte"
    assert config["attention"] == model.config.attention
    loaded = load_pretrained(out)
    assert loaded.config == model.config
    ids = torch.randint(0, model.config.vocab_size, (2, model.config.max_seq_len))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert isinstance(load_pretrained_tokenizer(out), ByteTokenizer)


def test_export_keeps_a_bf16_model_bit_identical(tmp_path):
    model = tiny_decoder().to(torch.bfloat16)
    out = export_pretrained(save_checkpoint(model, tmp_path / "c.ckpt"), tmp_path / "m")
    loaded = load_pretrained(out)
    assert loaded.embed.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_export_copies_a_bpe_tokenizer(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "parallax attention reads the covariance " * 20]
    tok = train_byte_bpe(texts, 300, tmp_path / "bpe.json")
    model = tiny_decoder(vocab_size=320)
    ckpt = save_checkpoint(model, tmp_path / "c.ckpt", tokenizer=str(tmp_path / "bpe.json"))
    out = export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "m")])
    assert out == 0
    back = load_pretrained_tokenizer(tmp_path / "m")
    assert isinstance(back, HFTokenizer)
    assert back.encode("the quick fox").tolist() == tok.encode("the quick fox").tolist()
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["eos_token_id"] == tok.eos_id


def test_export_refuses_to_overwrite(tmp_path, capsys):
    ckpt = save_checkpoint(tiny_decoder(), tmp_path / "c.ckpt")
    (tmp_path / "m").mkdir()
    assert export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "m"), "--overwrite"]) == 0
    assert (tmp_path / "m" / WEIGHTS_FILE).is_file()


def _exported(tmp_path):
    return export_pretrained(save_checkpoint(tiny_decoder(), tmp_path / "c.ckpt"), tmp_path / "m")


def _edit_config(folder, **changes):
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"not_a_field": 1}, "unknown model config key(s) ['not_a_field']"),
        ({"d_model": "32"}, "'d_model' must be of type int"),
        ({"tie_embeddings": 1}, "'tie_embeddings' must be of type bool"),
        ({"n_layers": True}, "'n_layers' must be of type int"),
        ({"attention": "magic"}, "DecoderConfig.attention"),
        ({"model_type": "llama"}, "model_type is 'llama'"),
        ({"format_version": 99}, "format_version is 99"),
        ({"tokenizer": "../../etc/passwd"}, "tokenizer must be 'byte'"),
    ],
)
def test_bad_config_json_is_a_named_error(tmp_path, changes, message):
    folder = _exported(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=None) as err:
        load_pretrained(folder)
    assert message in str(err.value)


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    folder = _exported(tmp_path)
    _edit_config(folder, d_model=64)
    with pytest.raises(CheckpointError, match=r"weight 'embed.weight' has shape \(320, 32\)"):
        load_pretrained(folder)
    folder = export_pretrained(save_checkpoint(tiny_decoder(), tmp_path / "d.ckpt"), tmp_path / "n")
    _edit_config(folder, n_layers=3)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.2"):
        load_pretrained(folder)


def test_a_corrupt_weights_file_is_a_named_error(tmp_path):
    folder = _exported(tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_pretrained(folder)


class _Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path, capsys):
    path = save_checkpoint(tiny_decoder(), tmp_path / "evil.ckpt", payload=_Boom())
    with pytest.raises(CheckpointError, match="holds Python objects"):
        load_model(path)
    assert "code ran" not in capsys.readouterr().out
    # a pickle where a folder expects safetensors is not unpickled either
    folder = _exported(tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointError):
        load_pretrained(folder)
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("hyper_parameters"), "has no hyper_parameters['model']"),
        (lambda c: c["hyper_parameters"]["model"].update(bogus=1), "unknown model config key(s) ['bogus']"),
        (lambda c: c.update(state_dict={"other.x": torch.zeros(1)}), "holds no 'model.*' weights"),
        (lambda c: c["state_dict"].pop("model.norm.weight"), "missing ['norm.weight']"),
        (
            lambda c: c["state_dict"].update({"model.norm.weight": torch.zeros(3)}),
            "weight 'norm.weight' has shape (3,)",
        ),
        (lambda c: c["state_dict"].update({"model.norm.weight": torch.zeros(32, dtype=torch.long)}), "not a floating"),
    ],
)
def test_bad_checkpoints_are_named_errors(tmp_path, edit, message):
    path = save_checkpoint(tiny_decoder(), tmp_path / "c.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert message in str(err.value)


def test_unknown_tokenizer_and_too_large_tokenizer_are_named(tmp_path):
    path = save_checkpoint(tiny_decoder(), tmp_path / "c.ckpt", tokenizer="bpe")
    with pytest.raises(CheckpointError, match="--tokenizer byte"):
        load_model(path)
    assert isinstance(load_model(path, tokenizer="byte").tokenizer, ByteTokenizer)
    small = save_checkpoint(tiny_decoder(vocab_size=100), tmp_path / "s.ckpt")
    with pytest.raises(CheckpointError, match="has 257 tokens but the model's vocab_size is 100"):
        load_model(small)
