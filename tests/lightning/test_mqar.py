"""MQAR: the generator's invariants, determinism, the power law of the query gaps, the DataModule's
mixtures and evaluation slices, bad inputs, and that the CPU config learns far above chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallax_lightning.long_context.mqar import (
    MQARDataModule,
    MQARSetting,
    check_mqar,
    mqar_examples,
    query_slot_log_weights,
)

IGNORE = -100


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())  # from the per-test seed of conftest


@pytest.mark.parametrize(
    ("seq_len", "kv", "vocab", "noise"),
    [(64, 4, 64, True), (64, 8, 8192, True), (67, 16, 40, False), (32, 8, 18, True), (1024, 256, 8192, True)],
)
def test_generator_invariants(seq_len, kv, vocab, noise):
    inputs, labels = mqar_examples(np.random.default_rng(_seed()), 32, seq_len, kv, vocab, random_non_queries=noise)
    assert inputs.shape == labels.shape == (32, seq_len)
    assert inputs.dtype == labels.dtype == np.int64
    assert inputs.min() >= 0 and inputs.max() < vocab
    half = vocab // 2
    context = 2 * kv
    for x, y in zip(inputs, labels):
        keys, values = x[0:context:2], x[1:context:2]
        # keys and values come from disjoint ranges, and are distinct within a sequence
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < vocab)).all()
        assert len(set(keys)) == kv and len(set(values)) == kv
        # labels only at the query positions, one per key, inside the query region at even offsets
        answered = np.flatnonzero(y != IGNORE)
        assert len(answered) == kv
        assert (answered >= context).all() and ((answered - context) % 2 == 0).all()
        assert (y[:context] == IGNORE).all()
        # each query is a key of the context, queried once, and its label is that key's value
        pair = dict(zip(keys.tolist(), values.tolist()))
        queried = x[answered]
        assert sorted(queried.tolist()) == sorted(keys.tolist())
        assert all(y[t] == pair[x[t]] for t in answered)
        if not noise:  # with blanks, everything but the queries is 0 after the context
            rest = np.ones(seq_len, dtype=bool)
            rest[:context] = False
            rest[answered] = False
            assert (x[rest] == 0).all()


def test_generator_is_a_function_of_the_seed():
    seed = _seed()
    a = mqar_examples(np.random.default_rng([seed, 3]), 16, 128, 16, 512)
    b = mqar_examples(np.random.default_rng([seed, 3]), 16, 128, 16, 512)
    c = mqar_examples(np.random.default_rng([seed, 4]), 16, 128, 16, 512)
    assert all((p == q).all() for p, q in zip(a, b))
    assert not (a[0] == c[0]).all()


def test_query_gaps_follow_the_power_law():
    """With one pair the query slot is a single draw: its frequencies must match p(g) ∝ (g+1)^(a−1)."""
    n, seq_len = 40_000, 42  # 20 slots after a 2-token context
    slots = (seq_len - 2) // 2
    for power_a in (0.01, 0.5, 1.0):
        _, labels = mqar_examples(np.random.default_rng(_seed()), n, seq_len, 1, 64, power_a=power_a)
        pos = np.argmax(labels != IGNORE, axis=1)
        counts = np.bincount((pos - 2) // 2, minlength=slots)
        w = np.exp(query_slot_log_weights(slots, power_a))
        expected = n * w / w.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 60, f"power_a={power_a}: chi² {chi2:.1f} over {slots - 1} dof; counts {counts[:5]}"
    # with many pairs the slots are drawn without replacement: the near ones fill first
    _, labels = mqar_examples(np.random.default_rng(_seed()), 2000, 256, 8, 64, power_a=0.01)
    gaps = (np.flatnonzero((labels != IGNORE).ravel()) % 256 - 16) // 2
    assert np.median(gaps) < 0.25 * (256 - 16) // 2 and gaps.max() > 60


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((60, 16, 8192), "does not fit in seq_len=60"),
        ((64, 8, 16), "vocab_size=16 is too small for 8 distinct keys and values"),
        ((64, 0, 8192), "num_kv_pairs must be a positive integer"),
        ((64, 4, 8192, 0.0), "power_a must be a finite positive number"),
    ],
)
def test_bad_settings_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        check_mqar(*args)
    with pytest.raises(ValueError, match=message):
        mqar_examples(np.random.default_rng(0), 2, *args)


def test_datamodule_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"data.length_test\[1\].*does not fit"):
        MQARDataModule(train=[{"seq_len": 64, "num_kv_pairs": 4}], length_test=[[128, 4], [64, 32]])
    with pytest.raises(ValueError, match=r"data.kv_test\[0\] \(len256_kv64\).*vocab_size=64 is too small"):
        MQARDataModule(train=[[64, 4]], kv_test=[[256, 64]], vocab_size=64)
    with pytest.raises(ValueError, match=r"data.train\[0\].*weight"):
        MQARDataModule(train=[{"seq_len": 64, "num_kv_pairs": 4, "weight": -1}])
    with pytest.raises(ValueError, match="batch_size"):
        MQARDataModule(batch_size=0)


def test_datamodule_stream_mixture_slices_and_resume():
    seed = _seed()
    dm = MQARDataModule(
        train=[MQARSetting(64, 4), MQARSetting(128, 8, weight=3.0)],
        length_test=[[256, 8]],
        kv_test=[[128, 16], [256, 8]],
        vocab_size=256,
        batch_size=4,
        num_val_examples=10,
        val_batch_size=4,
        seed=seed,
    )
    assert dm.seq_len == 256 and dm.vocab_size == 256
    stream = dm.train_stream(start=0, stop=40)
    batches = list(stream)
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert set(lengths) == {64, 128} and lengths.count(128) > lengths.count(64)  # weight 3 : 1
    # batch i depends on (seed, i) only: a stream started at 7 continues the same batches
    later = list(dm.train_stream(start=7, stop=9))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches[7:9], later))
    # two ranks split the world batch of one process with twice the batch
    big = MQARDataModule(train=dm.train_settings, vocab_size=256, batch_size=8, seed=seed).train_stream(0, 1)
    from parallax_lightning.long_context.mqar import MQARTrainStream

    halves = [next(iter(MQARTrainStream(dm, rank=r, world_size=2, stop=1)))["input_ids"] for r in range(2)]
    assert torch.equal(torch.cat(halves), next(iter(big))["input_ids"])
    # evaluation: each distinct setting once, with all its groups; sets do not depend on the batch size
    names = [s.setting.name for s in dm.eval_slices]
    assert names == ["len64_kv4", "len128_kv8", "len256_kv8", "len128_kv16"]
    assert dm.eval_slices[2].groups == ("len256_kv8", "len256", "kv8", "length_test", "kv_test")
    assert "" in dm.eval_slices[0].groups and "" not in dm.eval_slices[3].groups
    evals = dm.eval_batches()
    assert len(evals) == 4 * 3  # 10 examples in batches of 4
    other = MQARDataModule(
        train=dm.train_settings, length_test=[[256, 8]], kv_test=[[128, 16], [256, 8]], vocab_size=256,
        num_val_examples=10, val_batch_size=10, seed=seed,
    ).eval_batches()  # fmt: skip
    assert torch.equal(torch.cat([evals[i]["input_ids"] for i in range(3)]), other[0]["input_ids"])
    assert (
        evals[4]["slice"] == 1 and evals[4]["input_ids"].shape == (4, 128) and evals[5]["input_ids"].shape == (2, 128)
    )
    # checkpoint state: the stream resumes where it stopped
    state = dm.state_dict()
    assert state["next_batch"] == 0 and state["seq_len"] == 256
    dm.load_state_dict({**state, "next_batch": 7})
    assert torch.equal(next(iter(dm.train_stream()))["input_ids"], batches[7]["input_ids"])


class _Oracle(torch.nn.Module):
    """Reads the pairs from the context (blanks mode: it ends where an odd position stops holding a value) and
    answers every query — except in sequences with more than `wrong_above` pairs, where it answers the blank."""

    def __init__(self, vocab_size: int, wrong_above: int):
        super().__init__()
        self.vocab_size, self.wrong_above = vocab_size, wrong_above
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size, device=input_ids.device)
        for b, row in enumerate(input_ids.tolist()):
            context = next(i for i in range(0, T, 2) if row[i + 1] < self.vocab_size // 2)
            pairs = dict(zip(row[0:context:2], row[1:context:2]))
            for t in range(context, T):
                answer = pairs.get(row[t], 0) if len(pairs) <= self.wrong_above else 0
                logits[b, t, answer] = 1.0
        return logits


def test_per_slice_accuracy_is_pooled_by_group():
    import lightning.pytorch as pl

    from parallax_lightning.long_context.mqar import MQARModule
    from parallax_lightning.model import DecoderConfig

    dm = MQARDataModule(
        train=[[64, 4], [64, 8]],
        length_test=[[128, 4]],
        kv_test=[[128, 16]],
        vocab_size=64,
        random_non_queries=False,
        num_val_examples=6,
        val_batch_size=4,
    )
    module = MQARModule(model=DecoderConfig(vocab_size=64, max_seq_len=128, d_model=16, n_layers=1, n_heads=2))
    module.model = _Oracle(64, wrong_above=4)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    metrics = trainer.validate(module, datamodule=dm)[0]
    # answers: len64_kv4 6×4 right, len64_kv8 6×8 wrong, len128_kv4 6×4 right, len128_kv16 6×16 wrong
    expected = {
        "val/acc": 24 / (24 + 48),  # the in-distribution sets (the training settings) pooled by answer
        "val/acc/len64_kv4": 1.0,
        "val/acc/len64_kv8": 0.0,
        "val/acc/len64": 24 / 72,
        "val/acc/len128": 24 / (24 + 96),
        "val/acc/kv4": 1.0,
        "val/acc/kv8": 0.0,
        "val/acc/kv16": 0.0,
        "val/acc/length_test": 1.0,
        "val/acc/kv_test": 0.0,
    }
    got = {key: metrics[key] for key in expected}
    assert got == pytest.approx(expected)
