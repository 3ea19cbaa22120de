"""Passkey retrieval: prompt construction (exact length, needle at the asked depth), scoring, the training
data's labels, the grid's bookkeeping (with an oracle model that reads the prompt), bad inputs, and the
callback end to end (metrics and heat-map in an MLflow run)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from parallax_lightning.data.tokenizers import ByteTokenizer
from parallax_lightning.long_context.passkey import (
    PasskeyDataModule,
    PasskeyEval,
    PasskeyTask,
    passkey_grid,
)
from parallax_lightning.model import Decoder, DecoderConfig

from .platform_utils import fit_tiny_decoder

TOK = ByteTokenizer()


def _text(ids) -> str:
    return TOK.decode(ids)


@pytest.mark.parametrize("context_len", [160, 257, 1000])
def test_prompt_has_the_exact_length_and_the_needle_at_its_depth(context_len):
    task = PasskeyTask(TOK, digits=5)
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
    positions = []
    for depth in (0.0, 0.3, 0.5, 1.0):
        key = task.sample_passkey(rng)
        assert re.fullmatch(r"[1-9]\d{4}", key)
        p = task.prompt(context_len, depth, key)
        assert p.ids.shape == (context_len,) and p.ids.dtype == np.int64
        text = _text(p.ids)
        assert text.startswith("A pass key is hidden") and text.endswith("The pass key is ")
        assert text.count(key) == 1 and text.count("The pass key is") == 2  # the needle's and the question's
        needle = text.index(f" The pass key is {key}.")
        assert needle == p.needle_start  # bytes: character index = token index
        assert _text(p.answer) == key
        positions.append(needle)
    intro = len(task._intro)
    question = len(task._question)
    needle_len = task.min_context() - intro - question
    fill = context_len - task.min_context()
    assert positions[0] == intro  # depth 0: right after the introduction
    assert positions[-1] == context_len - question - needle_len  # depth 1: right before the question
    assert positions[1] == intro + round(0.3 * fill) and positions[0] < positions[1] < positions[2] < positions[3]


def test_scoring():
    task = PasskeyTask(TOK, digits=5)
    enc = TOK.encode
    assert task.score(enc("48213. The"), "48213")
    assert task.score(enc(" 48213"), "48213")
    assert not task.score(enc("4821"), "48213")  # too short
    assert not task.score(enc("482135"), "48213")  # too long
    assert not task.score(enc("x48213"), "48213")
    assert not task.score(enc(""), "48213")


@pytest.mark.parametrize("depth", [-0.1, 1.5, float("nan"), "half", True])
def test_depth_outside_unit_interval_is_named(depth):
    task = PasskeyTask(TOK)
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        task.prompt(300, depth, "12345")
    with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
        PasskeyEval(depths=[0.0, depth])


def test_other_bad_inputs_are_named():
    task = PasskeyTask(TOK)
    with pytest.raises(ValueError, match="context_len=50 is too short"):
        task.prompt(50, 0.5, "12345")
    with pytest.raises(ValueError, match="string of digits"):
        task.prompt(300, 0.5, "12a45")
    with pytest.raises(ValueError, match=r"\{key\}"):
        PasskeyTask(TOK, needle="no place for the number")
    with pytest.raises(ValueError, match=r"data\.seq_len=100 is too short"):
        PasskeyDataModule(seq_len=100)
    with pytest.raises(ValueError, match="smaller than the tokenizer's vocabulary"):
        PasskeyDataModule(seq_len=256, vocab_size=200)


def test_training_batches_label_only_the_answer():
    dm = PasskeyDataModule(seq_len=192, batch_size=4, seed=int(torch.randint(0, 1000, ()).item()))
    assert dm.vocab_size == 320 and dm.seq_len == 192  # 257 byte tokens padded to a multiple of 64
    batches = list(dm.train_stream(start=0, stop=3))
    again = list(dm.train_stream(start=2, stop=3))
    assert torch.equal(batches[2]["input_ids"], again[0]["input_ids"])
    for batch in batches:
        x, y = batch["input_ids"], batch["labels"]
        assert x.shape == y.shape == (4, 192)
        for row_x, row_y in zip(x, y):
            answered = torch.nonzero(row_y != -100).flatten()
            assert len(answered) == 5 and answered.tolist() == list(range(187, 192))
            text = _text(row_x.tolist())
            key = re.search(r"The pass key is (\d{5})\.", text).group(1)
            assert _text(row_y[answered].tolist()) == key
            assert text.endswith("The pass key is " + key[:-1])  # teacher forcing: the answer but its last digit


class _Oracle(Decoder):
    """Answers with the number after the first 'The pass key is ' of the prompt — except when the needle sits in
    the second half of the prompt, where it answers 00000. The grid must show exactly that."""

    def generate(self, prompt_ids, max_new_tokens, **kwargs):
        assert kwargs.get("temperature") == 0.0 and kwargs.get("use_cache") is True
        assert prompt_ids.shape[1] + max_new_tokens <= self.config.max_seq_len  # the guard was lifted
        rows = []
        for row in prompt_ids.tolist():
            text = _text(row)
            where = text.index("The pass key is ") + 16
            key = text[where : where + 5] if where < len(text) / 2 else "00000"
            rows.append(row + list(TOK.encode((key + "...")[:max_new_tokens])))
        return torch.tensor(rows)


def test_grid_bookkeeping_with_an_oracle():
    model = _Oracle(DecoderConfig(vocab_size=320, max_seq_len=64, d_model=32, n_layers=1, n_heads=2))
    depths = [0.0, 0.25, 0.75, 1.0]
    acc = passkey_grid(model, PasskeyTask(TOK), [200, 400], depths, samples=3, batch_size=2)
    assert acc.shape == (2, 4)
    assert (acc[:, :2] == 1.0).all() and (acc[:, 2:] == 0.0).all()
    assert model.config.max_seq_len == 64  # restored afterwards


def test_callback_logs_grid_and_heatmap_to_mlflow(tmp_path):
    from mlflow import MlflowClient

    from parallax_lightning.tracking import ParallaxMLFlowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dm = PasskeyDataModule(seq_len=160, batch_size=4, num_val_examples=4)
    callback = PasskeyEval(lengths=[160, 320], depths=[0.0, 1.0], samples=2)
    logger = ParallaxMLFlowLogger(experiment_name="passkey-test", tracking_uri=uri, system_metrics=False)
    fit_tiny_decoder(dm, 160, tmp_path, logger, callback, max_steps=2, val_check_interval=2, limit_val_batches=1)
    assert callback.last is not None and callback.last.shape == (2, 2)
    assert callback._evaluated_at == 2  # once, after the final validation (on_train_end did not repeat it)
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    for key in ("passkey/acc", "passkey/acc/len160", "passkey/acc/len320", "passkey/acc/depth0", "passkey/acc/depth1"):
        assert key in run.data.metrics, key
        assert 0.0 <= run.data.metrics[key] <= 1.0
    artifacts = [a.path for a in client.list_artifacts(logger.run_id, "figures")]
    assert "figures/passkey_heatmap.png" in artifacts
