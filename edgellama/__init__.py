"""edgellama: run LLaMA-family GGUF models on a laptop or a Raspberry Pi from Python.

``import edgellama`` stays light (no Numba, no tokenizer, no template engine): every public name
but ``ModelFormatError`` is imported on first use (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

import importlib

from .gguf import ModelFileNotFoundError, ModelFormatError

__all__ = [
    "load", "Model", "Tokenizer", "Sampler", "__version__",
    # one error type per domain; all of them are ValueError subclasses
    "ModelFormatError", "ModelFileNotFoundError", "ContextOverflowError", "MemoryLimitError", "SamplingError",
    "GenerationError", "TokenizerError", "ChatTemplateError",
]

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "Model": ".model",
    "ContextOverflowError": ".model",
    "MemoryLimitError": ".info",
    "SamplingError": ".sampling",
    "Sampler": ".sampling",
    "GenerationError": ".generate",
    "Tokenizer": ".tokenizer",
    "TokenizerError": ".tokenizer",
    "ChatTemplateError": ".chat",
}


def load(path, n_ctx=None, threads=None, **kwargs):
    """Load a GGUF model: ``edgellama.load("model.gguf", n_ctx=2048, threads=2)``.

    ``n_ctx``: None = min(the model's trained context, 4096), 0 = the trained context.  Raises
    ``ModelFileNotFoundError`` (a ``FileNotFoundError``) for a missing file, ``ModelFormatError`` for
    a bad one, and ``MemoryLimitError`` when the weights, KV cache and buffers would not fit in the
    memory available.
    """
    from .model import Model  # imported here so metadata-only use never imports Numba

    return Model.load(path, n_ctx=n_ctx, threads=threads, **kwargs)


def _version() -> str:
    """The installed distribution's version (from pyproject.toml at install time); from a source
    tree that was never installed, pyproject.toml itself."""
    from importlib import metadata

    try:
        return metadata.version("edgellama")
    except metadata.PackageNotFoundError:
        import re
        from pathlib import Path

        try:
            text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
        except OSError:
            return "0+unknown"
        m = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        return m.group(1) if m else "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
