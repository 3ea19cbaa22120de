"""Data: every text source, the tokenizers (and that a trained BPE is saved and reused), llm.c shards and
their header checks, the deterministic resumable batch stream, and the bad inputs named before training."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from parallax_lightning.data import TextDataModule, TokenShardDataModule
from parallax_lightning.data.sampling import EvalBatches, RandomBatchStream, TokenWindows
from parallax_lightning.data.shards import HEADER_BYTES, MAGIC, ShardError, open_shard, read_header, write_shard
from parallax_lightning.data.sources import TextSource, expand_paths, is_validation_document, stdlib_files
from parallax_lightning.data.tokenizers import ByteTokenizer, HFTokenizer, train_byte_bpe

from .platform_utils import write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


# ------------------------------------------------------------------------------------------ sources


def test_expand_paths_files_folders_globs(corpus):
    files = sorted(corpus.glob("*.txt"))
    assert expand_paths(str(files[0])) == [files[0]]
    assert expand_paths(str(corpus)) == files
    assert expand_paths(str(corpus / "doc0*.txt")) == [f for f in files if f.name.startswith("doc0")]
    (corpus / "notes.md").write_text("markdown")
    assert expand_paths(str(corpus), suffixes=[".md"]) == [corpus / "notes.md"]


@pytest.mark.parametrize("kind", ["missing", "glob", "folder"])
def test_missing_data_named(tmp_path, kind):
    (tmp_path / "empty").mkdir()
    pattern = {"missing": tmp_path / "nope.txt", "glob": tmp_path / "*.nothing", "folder": tmp_path / "empty"}[kind]
    with pytest.raises(FileNotFoundError, match=str(pattern).replace("*", r"\*")):
        TextDataModule(source=str(pattern))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ValueError, match=r"is empty: its 2 file\(s\) hold no bytes"):
        TextDataModule(source=str(tmp_path))
    (tmp_path / "c.txt").write_text("   \n\n  ")
    dm = TextDataModule(source=str(tmp_path))
    with pytest.raises(ValueError, match="is empty: no text in any document"):
        dm.setup()


def test_stdlib_corpus_is_python_without_tests():
    files = stdlib_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any("test" in f.parts or "tests" in f.parts for f in files)
    dm = TextDataModule(seq_len=64, batch_size=2, max_bytes=200_000)  # the default source
    dm.setup()
    text = ByteTokenizer().decode(dm.train_stream().batch(0)["input_ids"][0])
    assert len(text) > 10
    assert dm.train_windows.num_tokens + dm.val_windows.num_tokens <= 200_000 + 1000  # + one eos per document


def test_max_bytes_and_max_documents_cap_the_corpus(corpus):
    src = TextSource(paths=str(corpus), max_documents=3)
    assert len(list(src.documents())) == 3
    src = TextSource(paths=str(corpus), max_bytes=1000)
    assert sum(len(d.encode()) for d in src.documents()) == 1000


def test_validation_split_is_a_function_of_the_index():
    picks = [is_validation_document(i, 0.1) for i in range(5000)]
    assert picks == [is_validation_document(i, 0.1) for i in range(5000)]
    assert 0.08 < sum(picks) / len(picks) < 0.12
    assert not any(is_validation_document(i, 0.0) for i in range(100))


def test_hf_dataset_through_a_stand_in_datasets_package(monkeypatch):
    calls = {}

    class FakeDataset(list):
        column_names = ("text", "id")

    def load_dataset(name, config=None, split="train", **kwargs):
        calls.update(name=name, config=config, split=split)
        return FakeDataset({"text": f"document {i} " * 40, "id": i} for i in range(30))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dm = TextDataModule(hf_dataset="someone/corpus", hf_config="raw", hf_split="train", seq_len=16, batch_size=2)
    dm.setup()
    assert calls == {"name": "someone/corpus", "config": "raw", "split": "train"}
    assert "document" in ByteTokenizer().decode(dm.train_stream().batch(0)["input_ids"].flatten())
    bad = TextDataModule(hf_dataset="someone/corpus", text_field="content", seq_len=16)
    with pytest.raises(KeyError, match="content"):
        bad.setup()


def test_hf_dataset_without_the_package_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        TextDataModule(hf_dataset="someone/corpus")


# --------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_vocab(corpus):
    tok = ByteTokenizer()
    text = "héllo wörld — ∑"
    assert tok.decode(tok.encode(text)) == text
    dm = TextDataModule(source=str(corpus))
    assert dm.vocab_size == 320  # 256 bytes + end-of-document, padded to a multiple of 64
    assert TextDataModule(source=str(corpus), vocab_size=300).vocab_size == 300


def test_vocab_smaller_than_the_tokenizer_is_named(corpus):
    dm = TextDataModule(source=str(corpus), vocab_size=200)
    with pytest.raises(ValueError, match=r"vocab_size=200 is smaller than the tokenizer's vocabulary \(257\)"):
        _ = dm.vocab_size


def test_bpe_is_trained_saved_beside_the_data_and_reused(corpus, monkeypatch):
    dm = TextDataModule(source=str(corpus), tokenizer="bpe", bpe_vocab_size=300, seq_len=16)
    assert dm.vocab_size == 320
    saved = list((corpus / ".parallax_cache").glob("bpe300-*.json"))
    assert len(saved) == 1
    dm.setup()
    tok = dm.get_tokenizer()
    text = "the quick brown fox"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode())  # merges learned from the corpus

    import parallax_lightning.data.text_datamodule as text_dm

    def no_training(*args, **kwargs):
        raise AssertionError("the saved tokenizer should have been reused")

    monkeypatch.setattr(text_dm, "train_byte_bpe", no_training)
    again = TextDataModule(source=str(corpus), tokenizer="bpe", bpe_vocab_size=300, seq_len=16)
    again.setup()
    assert again.get_tokenizer().encode(text).tolist() == tok.encode(text).tolist()
    first = dm.train_stream().batch(5)["input_ids"]
    assert torch.equal(again.train_stream().batch(5)["input_ids"], first)  # token cache gives the same stream


def test_hf_tokenizer_json_by_path(tmp_path, corpus):
    path = tmp_path / "tok" / "tokenizer.json"
    trained = train_byte_bpe([p.read_text() for p in sorted(corpus.glob("*.txt"))], 290, path)
    for spec in (str(path), str(path.parent)):  # the file, or the folder holding it
        dm = TextDataModule(source=str(corpus), tokenizer=spec, seq_len=16)
        assert dm.get_tokenizer().vocab_size == trained.vocab_size == 290
    with pytest.raises(FileNotFoundError, match=r"nothing\.json"):
        TextDataModule(source=str(corpus), tokenizer=str(tmp_path / "nothing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        HFTokenizer.from_file(tmp_path / "bad.json")


def test_tokenizer_ids_beyond_its_vocabulary_are_named(tmp_path):
    """A tokenizer.json whose ids skip past its size would give ids the model has no embedding row for."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 700}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "gappy.json"))
    with pytest.raises(ValueError, match=r"gappy\.json' maps token 'b' to id 700, outside its vocabulary of 3 ids"):
        HFTokenizer.from_file(tmp_path / "gappy.json")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "dense.json"))
    assert HFTokenizer.from_file(tmp_path / "dense.json").vocab_size == 3


# ------------------------------------------------------------------------------------------ binary files
def _mixed_corpus(tmp_path):
    """Text files, a binary one (NUL bytes), random bytes without NULs, and a Latin-1 text file."""
    folder = write_corpus(tmp_path / "mixed", n_docs=3, words_per_doc=100)
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    noise = np.random.default_rng(0).integers(1, 256, 4000, dtype=np.uint8).tobytes()  # no NUL byte
    (folder / "noise.bin").write_bytes(noise)
    (folder / "latin1.txt").write_bytes("Café crème, déjà vu: à la française. ".encode("latin-1") * 40)
    return folder


def test_binary_files_are_named_in_a_warning_by_default(tmp_path):
    folder = _mixed_corpus(tmp_path)
    with pytest.warns(UserWarning, match=r"2 file\(s\) look binary") as caught:
        files = TextSource(paths=str(folder)).files()
    message = str(caught[0].message)
    assert "image.png (a NUL byte at offset 8)" in message and "noise.bin (" in message and "not UTF-8" in message
    assert "latin1.txt" not in message  # text in another encoding: a few undecodable bytes, not binary
    assert "data.binary_files=skip" in message and "data.suffixes" in message
    assert len(files) == 6  # still read, as before


def test_binary_files_skip_and_error(tmp_path):
    folder = _mixed_corpus(tmp_path)
    with pytest.warns(UserWarning, match="left out"):
        kept = TextSource(paths=str(folder), binary_files="skip").files()
    assert sorted(p.name for p in kept) == ["doc00.txt", "doc01.txt", "doc02.txt", "latin1.txt"]
    with pytest.raises(ValueError, match=r"image\.png \(a NUL byte at offset 8\)"):
        TextDataModule(source=str(folder), binary_files="error")
    with pytest.raises(ValueError, match="binary_files must be one of"):
        TextSource(paths=str(folder), binary_files="ignore")
    with pytest.raises(ValueError, match="no text is left"):
        TextSource(paths=str(folder / "image.png"), binary_files="skip").files()


def test_text_corpora_raise_no_binary_warning(corpus, recwarn):
    TextSource(paths=str(corpus)).files()
    TextSource(paths="stdlib", max_documents=200).files()
    assert not [w for w in recwarn if "binary" in str(w.message)]


# ------------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize("version", [1, 2])
def test_shard_round_trip(tmp_path, version):
    top = 60_000 if version == 1 else 100_000
    tokens = np.random.default_rng(0).integers(0, top, size=1001)
    path = write_shard(tmp_path / "s.bin", tokens, version=version)
    assert read_header(path) == (version, 1001)
    assert np.array_equal(open_shard(path), tokens)
    assert path.stat().st_size == HEADER_BYTES + 1001 * (2 if version == 1 else 4)


def test_write_shard_refuses_tokens_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        write_shard(tmp_path / "s.bin", np.array([70_000]), version=1)


def _header(magic=MAGIC, version=1, count=10):
    h = np.zeros(256, dtype="<i4")
    h[:3] = magic, version, count
    return h.tobytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00" * 100, "shorter than the 1024-byte header"),
        (_header(magic=1234) + b"\x00" * 20, "magic number 1234"),
        (_header(version=7) + b"\x00" * 20, "unsupported version 7"),
        (_header(count=10) + b"\x00" * 12, "header says 10 tokens"),
    ],
)
def test_corrupt_shard_is_named(tmp_path, content, message):
    bad = tmp_path / "train_000.bin"
    bad.write_bytes(content)
    with pytest.raises(ShardError, match=message) as info:
        TokenShardDataModule(train_files=str(tmp_path / "*.bin"), vocab_size=64)
    assert "train_000.bin" in str(info.value)


def _shards(folder, n_train=2, length=3000, vocab=300, meta=True):
    rng = np.random.default_rng(1)
    for i in range(n_train):
        write_shard(folder / f"data_train_{i:06d}.bin", rng.integers(0, vocab, size=length))
    write_shard(folder / "data_val_000000.bin", rng.integers(0, vocab, size=length // 2))
    if meta:
        (folder / "meta.json").write_text(json.dumps({"vocab_size": vocab, "tokenizer": "byte"}))


def test_shard_datamodule_train_and_val(tmp_path):
    _shards(tmp_path)
    dm = TokenShardDataModule(
        train_files=str(tmp_path / "*_train_*.bin"), val_files=str(tmp_path / "*_val_*.bin"), seq_len=32, batch_size=4
    )
    assert dm.vocab_size == 320  # meta.json's 300, padded
    dm.setup()
    assert dm.train_windows.num_tokens == 6000 and dm.val_windows.num_tokens == 1500
    batch = dm.train_stream().batch(0)
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert len(dm.val_dataloader()) == -(-(1499 // 32) // 4)


def test_shards_without_val_files_hold_out_a_tail(tmp_path):
    _shards(tmp_path)
    dm = TokenShardDataModule(train_files=str(tmp_path / "*_train_*.bin"), seq_len=32, val_fraction=0.1)
    dm.setup()
    assert dm.val_windows.num_tokens == 300 and dm.train_windows.num_tokens == 5700


def test_shard_tokens_outside_the_vocabulary_are_named(tmp_path):
    _shards(tmp_path, vocab=300, meta=False)
    dm = TokenShardDataModule(train_files=str(tmp_path / "*_train_*.bin"), vocab_size=200, seq_len=32)
    with pytest.raises(ValueError, match=r"data_train_000000.bin.* outside vocab_size=200"):
        dm.setup()


def test_shards_need_a_vocabulary(tmp_path):
    _shards(tmp_path, meta=False)
    with pytest.raises(ValueError, match=r"set data\.vocab_size"):
        TokenShardDataModule(train_files=str(tmp_path / "*_train_*.bin"))


def _data_help(cls) -> str:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    return " ".join(parser.format_help().split())  # argparse wraps lines wherever the terminal width says


@pytest.mark.parametrize("name", ["TextDataModule", "TokenShardDataModule", "PasskeyDataModule"])
def test_loader_settings_declared_once_are_listed_with_their_docs(name):
    # The loader settings live in TokenDataModule only; each data module's --data.help still lists them with
    # the base class's documentation, and a default a subclass restates is the one shown.
    from parallax_lightning.long_context import PasskeyDataModule

    cls = {"TextDataModule": TextDataModule, "TokenShardDataModule": TokenShardDataModule}.get(name, PasskeyDataModule)
    text = _data_help(cls)
    for key, doc in (
        ("batch_size", "sequences per batch on each device"),
        ("vocab_size", "model vocabulary; None = the tokenizer's"),
        ("seed", "the data seed; training batch i is a pure function of (seed, i)"),
        ("num_workers", "DataLoader worker processes"),
        ("predict_prompts", "texts that `predict` continues"),
    ):
        assert f"--data.{key} " in text and doc in text, key
    defaults = {"TextDataModule": (256, 16), "TokenShardDataModule": (1024, 16), "PasskeyDataModule": (256, 32)}[name]
    seq_len = text.rsplit("--data.seq_len SEQ_LEN", 1)[1]  # the option's entry, after the usage line
    batch_size = text.rsplit("--data.batch_size BATCH_SIZE", 1)[1]
    assert f"default: {defaults[0]})" in seq_len.split("--data.")[0]
    assert f"default: {defaults[1]})" in batch_size.split("--data.")[0]
    # Passkey validation is generated: it holds out no share of the data, so it takes no val_fraction.
    assert ("--data.val_fraction" in text) == (name != "PasskeyDataModule")


def test_sequence_longer_than_the_data_is_named(tmp_path):
    _shards(tmp_path, length=100)
    dm = TokenShardDataModule(train_files=str(tmp_path / "*_train_*.bin"), seq_len=200)
    with pytest.raises(ValueError, match="seq_len=200 is larger than the training data"):
        dm.setup()
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.txt").write_text("tiny text")
    dm = TextDataModule(source=str(tmp_path / "small"), seq_len=64)
    with pytest.raises(ValueError, match="seq_len=64 is larger than the"):
        dm.setup()


# ---------------------------------------------------------------------------------------- sampling


def _windows(n=5000, seq_len=8):
    return TokenWindows([np.arange(n) % 251, (np.arange(n // 2) * 7) % 251], seq_len)


def test_windows_never_cross_arrays():
    w = _windows()
    starts = np.arange(w.num_windows)
    rows = w.gather(starts)
    first = np.arange(5000) % 251
    second = (np.arange(2500) * 7) % 251
    ok = [
        np.array_equal(r, first[s : s + 9]) or np.array_equal(r, second[s - (5000 - 8) : s - (5000 - 8) + 9])
        for s, r in zip(starts, rows)
    ]
    assert all(ok)
    assert w.num_windows == (5000 - 8) + (2500 - 8)


def test_batch_i_is_a_function_of_seed_and_i():
    w = _windows()
    a, b = RandomBatchStream(w, 4, seed=3), RandomBatchStream(w, 4, seed=3)
    assert all(torch.equal(a.batch(i)["input_ids"], b.batch(i)["input_ids"]) for i in (0, 1, 17, 10**6))
    assert not torch.equal(a.batch(0)["input_ids"], RandomBatchStream(w, 4, seed=4).batch(0)["input_ids"])
    assert not torch.equal(a.batch(0)["input_ids"], a.batch(1)["input_ids"])


def test_stream_resumes_exactly_at_any_index():
    w = _windows()
    full = list(RandomBatchStream(w, 4, seed=5, stop=10))
    resumed = list(RandomBatchStream(w, 4, seed=5, start=6, stop=10))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(full[6:], resumed))


def test_ranks_take_slices_of_the_world_batch():
    w = _windows()
    world = RandomBatchStream(w, 6, seed=9).batch(4)["input_ids"]
    parts = [RandomBatchStream(w, 3, seed=9, rank=r, world_size=2).batch(4)["input_ids"] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), world)


def test_stream_is_the_same_with_loader_workers():
    w = _windows()
    plain = [b["input_ids"] for b in DataLoader(RandomBatchStream(w, 2, seed=1, start=3, stop=9), batch_size=None)]
    workers = DataLoader(RandomBatchStream(w, 2, seed=1, start=3, stop=9), batch_size=None, num_workers=2)
    assert all(torch.equal(x, y["input_ids"]) for x, y in zip(plain, workers, strict=True))


def test_datamodule_state_restores_the_stream_position(corpus):
    dm = TextDataModule(source=str(corpus), seq_len=16, batch_size=2, seed=21)
    expected = dm.train_stream(start=0).batch(7)["input_ids"]
    state = {**dm.state_dict(), "next_batch": 7}
    fresh = TextDataModule(source=str(corpus), seq_len=16, batch_size=2, seed=21)
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh.train_dataloader()))["input_ids"], expected)
    # The restored position is used once: a later reload follows the trainer (here none: batch 0), instead of
    # replaying the resume point's batches.
    assert fresh.train_stream().start == 0
    other = TextDataModule(source=str(corpus), seq_len=16, batch_size=2, seed=22)
    with pytest.warns(UserWarning, match="seed: 21 -> 22"):
        other.load_state_dict(state)


def test_eval_batches_cover_each_window_once():
    w = TokenWindows([np.arange(1000) % 97], 10)
    ev = EvalBatches(w, batch_size=8)
    inputs = torch.cat([ev[i]["input_ids"] for i in range(len(ev))])
    assert inputs.shape == (99, 10)
    assert sorted(inputs[:, 0].tolist()) == sorted(((np.arange(99) * 10) % 97).tolist())
    again = EvalBatches(w, batch_size=8)
    assert torch.equal(again[3]["input_ids"], ev[3]["input_ids"])


def test_prepare_shards_script_round_trip(tmp_path, corpus):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "prepare_shards.py"
    spec = importlib.util.spec_from_file_location("prepare_shards", script)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    out = tmp_path / "shards"
    args = ["--source", str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "300"]
    meta = prepare.main([*args, "--shard-tokens", "2000", "--val-fraction", "0.25"])
    assert meta["vocab_size"] == 300 and (out / "tokenizer.json").is_file()
    assert len(meta["train_shards"]) > 1  # split at --shard-tokens
    assert all(read_header(out / name)[1] <= 2000 for name in meta["train_shards"])
    dm = TokenShardDataModule(train_files=str(out / "*_train_*.bin"), val_files=str(out / "*_val_*.bin"), seq_len=16)
    assert dm.vocab_size == 320 and dm.get_tokenizer().vocab_size == 300
    dm.setup()
    assert dm.train_windows.num_tokens == meta["train_tokens"] and dm.val_windows.num_tokens == meta["val_tokens"]
    # the same documents, tokenized the same way, as the text module sees them
    text_dm = TextDataModule(source=str(corpus), tokenizer=str(out / "tokenizer.json"), val_fraction=0.25, seq_len=16)
    text_dm.setup()
    assert np.array_equal(np.concatenate(dm.val_windows.arrays), text_dm.val_windows.arrays[0])
    with pytest.raises(SystemExit, match="not empty"):
        prepare.main(args)  # never overwrites
