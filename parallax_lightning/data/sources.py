"""Where text comes from: local files / folders / globs, the Python standard library's own sources
(always present, even offline), and Hugging Face `datasets` by name when that package is installed.

Every source is a list of documents (one per file or dataset row). Nothing here imports lightning, so
`experiments/prepare_shards.py` starts fast.

Files are read as UTF-8 with undecodable bytes replaced (one stray byte does not stop a run). A file that
is not text at all (an image, an archive, a .pyc, UTF-16) would still be trained on that way, as noise, so
local files are sniffed first: a NUL byte, or more than 30% undecodable bytes, in the first 8 KB marks a file
as binary. `binary_files` says what then happens: "warn" (the default: one warning naming the files, which
are still read as text), "skip" (leave them out, with that warning) or "error" (refuse, naming them). A
folder that mixes text and other files is best narrowed with `suffixes`.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

STDLIB = "stdlib"
# Folders of the standard library that are tests or third-party code, not the library itself.
_STDLIB_EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_files() -> list[Path]:
    """The running Python's standard library `.py` sources, tests excluded, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_EXCLUDED_PARTS.isdisjoint(path.relative_to(root).parts):
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no standard library sources found under {root} (is this a stripped Python?)")
    return files


def expand_paths(patterns: str | Sequence[str], suffixes: Sequence[str] | None = None) -> list[Path]:
    """Files named by paths, folders (searched recursively) and glob patterns, each pattern checked.

    "stdlib" stands for the standard library's sources. A pattern that matches nothing raises
    FileNotFoundError naming it, so a typo never trains silently on less data than intended.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no data source given (expected a path, folder, glob or 'stdlib')")
    wanted = tuple(s if s.startswith(".") else "." + s for s in suffixes) if suffixes else None
    out: list[Path] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if pattern == STDLIB:
            out.extend(stdlib_files())
            continue
        path = Path(pattern).expanduser()
        if path.is_file():
            out.append(path)
            continue
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
            if wanted:
                found = [p for p in found if p.name.endswith(wanted)]
            if not found:
                what = f" with suffix {list(wanted)}" if wanted else ""
                raise FileNotFoundError(f"data folder {pattern!r} holds no files{what}")
            out.extend(found)
            continue
        if glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"data glob {pattern!r} matches no files")
            out.extend(found)
            continue
        raise FileNotFoundError(f"data path {pattern!r} does not exist")
    return out


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


BinaryFiles = Literal["warn", "skip", "error"]
BINARY_FILES: tuple[str, ...] = get_args(BinaryFiles)
SNIFF_BYTES = 8192
UNDECODABLE_SHARE = 0.3


def binary_reason(path: str | os.PathLike) -> str | None:
    """Why the start of `path` looks binary rather than text ('a NUL byte at offset 12'), or None."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head:
        return None
    nul = head.find(b"\0")
    if nul >= 0:
        return f"a NUL byte at offset {nul}"
    # final=False: a character cut at the end of the sample is not counted as undecodable.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    bad = text.count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
    if text and bad / len(text) > UNDECODABLE_SHARE:
        return f"{bad / len(text):.0%} of its first {len(head)} bytes are not UTF-8"
    return None


def read_text(path: Path) -> str:
    # Corpora in the wild hold stray bytes; replacing them keeps one bad byte from stopping a run.
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def load_hf_dataset(name: str, config: str | None = None, split: str = "train"):
    """`datasets.load_dataset`, imported only when a Hugging Face dataset is asked for."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"hf_dataset={name!r} needs the Hugging Face `datasets` package (pip install 'parallax-lab[datasets]' or pip install datasets); "
            "or point the data source at local files"
        ) from err
    return datasets.load_dataset(name, config, split=split)


@dataclass
class TextSource:
    """A list of documents from local files or a Hugging Face dataset.

    Local: `paths` is one or more paths / folders / globs / "stdlib". HF: `hf_dataset` names the dataset
    (`hf_config`, `hf_split`, `text_field` pick the part and column); it wins over `paths`.
    `max_documents` / `max_bytes` cap the corpus (the order is stable, so the cap is reproducible).
    `binary_files`: what a local file that looks binary does, "warn", "skip" or "error" (module docstring).
    """

    paths: str | list[str] = STDLIB
    suffixes: list[str] | None = None
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None
    max_bytes: int | None = None
    binary_files: BinaryFiles = "warn"
    _files: list[Path] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.max_documents is not None and self.max_documents <= 0:
            raise ValueError(f"max_documents must be positive, got {self.max_documents}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.binary_files not in BINARY_FILES:
            raise ValueError(f"binary_files must be one of {BINARY_FILES}, got {self.binary_files!r}")

    @property
    def is_hf(self) -> bool:
        return self.hf_dataset is not None

    def files(self) -> list[Path]:
        """The local files (checked to exist and hold something), capped by max_documents."""
        if self.is_hf:
            return []
        if self._files is None:
            files = self._sniff(expand_paths(self.paths, self.suffixes))
            if self.max_documents is not None:
                files = files[: self.max_documents]
            if sum(f.stat().st_size for f in files) == 0:
                raise ValueError(f"data source {self.describe()} is empty: its {len(files)} file(s) hold no bytes")
            self._files = files
        return self._files

    def _sniff(self, files: list[Path]) -> list[Path]:
        """Apply `binary_files` to the files that look binary."""
        binary = {}
        for path in files:
            reason = binary_reason(path)
            if reason:
                binary[path] = reason
        if not binary:
            return files
        named = "; ".join(f"{p} ({why})" for p, why in list(binary.items())[:5])
        more = f" and {len(binary) - 5} more" if len(binary) > 5 else ""
        what = f"data source {self.describe()}: {len(binary)} file(s) look binary, not text: {named}{more}"
        fix = "Pick text files with data.suffixes (or a narrower path or glob)"
        if self.binary_files == "error":
            raise ValueError(f"{what}. {fix}, or set data.binary_files=skip to leave them out")
        if self.binary_files == "skip":
            kept = [p for p in files if p not in binary]
            if not kept:
                raise ValueError(f"{what}: no text is left (data.binary_files=skip). {fix}")
            warnings.warn(f"{what}; left out (data.binary_files=skip)", stacklevel=3)
            return kept
        warnings.warn(
            f"{what}; they are read as text, undecodable bytes replaced. {fix}, or set data.binary_files=skip "
            "to leave them out (error: refuse)",
            stacklevel=3,
        )
        return files

    def check(self) -> None:
        """Raise now, before any work, if the source is missing or empty."""
        if self.is_hf:
            try:
                import datasets  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    f"hf_dataset={self.hf_dataset!r} needs the Hugging Face `datasets` package (pip install datasets)"
                ) from err
        else:
            self.files()

    def documents(self) -> Iterator[str]:
        """Yield documents in a stable order until a cap is reached."""
        budget = self.max_bytes
        count = 0
        for text in self._raw_documents():
            if not text:
                continue
            if budget is not None:
                size = len(text.encode("utf-8"))
                if size > budget:
                    text = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
                    size = budget
                budget -= size
            yield text
            count += 1
            if (budget is not None and budget <= 0) or (self.max_documents is not None and count >= self.max_documents):
                return

    def _raw_documents(self) -> Iterator[str]:
        if self.is_hf:
            dataset = load_hf_dataset(self.hf_dataset, self.hf_config, self.hf_split)
            columns = getattr(dataset, "column_names", None)
            if columns is not None and self.text_field not in columns:
                raise KeyError(
                    f"hf dataset {self.hf_dataset!r} has no column text_field={self.text_field!r}; columns: {columns}"
                )
            for row in dataset:
                yield row[self.text_field]
        else:
            for path in self.files():
                yield read_text(path)

    def describe(self) -> str:
        if self.is_hf:
            return f"hf:{self.hf_dataset}" + (f"/{self.hf_config}" if self.hf_config else "") + f"[{self.hf_split}]"
        paths = [self.paths] if isinstance(self.paths, str) else list(self.paths)
        return ",".join(paths)

    def fingerprint(self) -> str:
        """Changes when the corpus does (names, sizes, mtimes of local files; the name and caps otherwise)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((self.describe(), self.text_field, self.max_documents, self.max_bytes)).encode())
        for f in self.files():
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()


def is_validation_document(index: int, fraction: float, seed: int = 0) -> bool:
    """Whether document `index` belongs to the validation split: a pure function of (seed, index).

    Hash-based, so a streamed corpus splits the same way as a listed one and adding documents at the end
    does not move earlier ones between splits.
    """
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction
