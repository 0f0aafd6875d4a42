"""llama.cpp's own C++ tools (llama-bench, llama-quantize, llama-perplexity, llama-server), built
once from the llama.cpp sources vendored in the llama-cpp-python source distribution and cached.

The reference for speed is llama.cpp's C++ ``llama-bench``, not the Python binding (whose per-token
Python cost flatters us on small models).  This fetches ``llama-cpp-python==VERSION``'s sdist from
PyPI (``pip download --no-binary :all: --no-deps``), builds the four tools with CMake for this
machine's CPU (``GGML_NATIVE``: what llama.cpp's users get from a source build), and keeps them in
``$EDGELLAMA_MODELS/llama.cpp-VERSION-<machine>/bin`` (default ``~/.cache/edgellama``).  About 10
minutes on 2 cores, once.

Usage:  python tools/llamacpp.py [--jobs N]        # builds if needed, prints the bin directory
        from tools.llamacpp import tool; tool("llama-bench")   # the path of one binary
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.fetch_models import cache_dir  # noqa: E402

VERSION = "0.3.36"
TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity", "llama-server")
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
]


def build_dir() -> Path:
    return cache_dir() / f"llama.cpp-{VERSION}-{platform.machine()}"


def bin_dir() -> Path:
    return build_dir() / "bin"


def tool(name: str) -> Path:
    """The path of one of TOOLS, building them first if they are not there yet."""
    if name not in TOOLS:
        raise ValueError(f"{name!r} is not one of {', '.join(TOOLS)}")
    path = bin_dir() / name
    if not path.exists():
        build()
    return path


def available() -> bool:
    return all((bin_dir() / t).exists() for t in TOOLS)


def build(jobs: int | None = None, quiet: bool = False) -> Path:
    """Download the sdist, build TOOLS, install them into bin_dir() (atomically); returns it."""
    if available():
        return bin_dir()
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise RuntimeError(f"building llama.cpp needs {exe} on PATH")
    out = build_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 2
    log = None if not quiet else subprocess.DEVNULL
    with tempfile.TemporaryDirectory(prefix="llamacpp-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", str(tmp)], check=True, stdout=log)
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = tmp / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_OPTIONS], check=True, stdout=log)
        subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS], check=True,
                       stdout=log)
        staged = tmp / "bin"
        staged.mkdir()
        for t in TOOLS:
            shutil.copy2(build / "bin" / t, staged / t)
        (staged / "BUILD_INFO").write_text(f"llama-cpp-python {VERSION} sdist, cmake {' '.join(CMAKE_OPTIONS)}\n")
        out.mkdir(exist_ok=True)
        if bin_dir().exists():
            shutil.rmtree(bin_dir())
        os.replace(staged, bin_dir())
    return bin_dir()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    args = p.parse_args(argv)
    print(build(args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
