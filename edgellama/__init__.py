"""edgellama: run LLaMA-family GGUF models on a laptop or a Raspberry Pi from Python."""

from .gguf import ModelFormatError

__version__ = "0.1.0"
__all__ = ["load", "ModelFormatError", "__version__"]


def load(path, n_ctx=None, threads=None, **kwargs):
    """Load a GGUF model: ``edgellama.load("model.gguf", n_ctx=2048, threads=2)``."""
    from .model import Model  # imported here so metadata-only use never imports Numba

    return Model.load(path, n_ctx=n_ctx, threads=threads, **kwargs)
