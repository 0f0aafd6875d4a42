"""The files of a model folder, checked before they are read.

A model folder comes from a stranger (a git clone, a tarball): any of its names can be a symlink or
a special file.  Every file the quantizer reads from a folder must be a regular file (a device or a
FIFO would be read without end, or block); links are followed (a ``--local-dir`` download links its
weights into the Hugging Face cache, Meta's layout links ``../tokenizer.model``), as what they lead
to must parse as the file it stands for.  A file whose text is copied into the output as it is, a
``chat_template.jinja``, must moreover resolve inside the folder: a symlink to ``~/.ssh/id_rsa``
under that name must not travel into a GGUF that gets published.  A Hugging Face cache snapshot
(``models--org--name/snapshots/<revision>/``), whose files are symlinks into the repository's
``blobs/``, counts the repository folder as its own.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgellama.gguf import ModelFormatError


def folder_root(folder: Path) -> Path:
    """Where the files of ``folder`` may resolve to."""
    root = Path(folder).resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent  # (a Hugging Face cache: the snapshot's files are links into blobs/)
    return root


def regular_file(path: Path, root: Path | None = None) -> Path:
    """``path``, checked to be a regular file (and, with ``root``, to resolve inside it);
    ModelFormatError naming ``path`` otherwise."""
    path = Path(path)
    try:
        real = path.resolve(strict=True)
        st = os.stat(real)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no such file") from None
    except RuntimeError:  # (Python < 3.13: a symlink loop)
        raise ModelFormatError(f"{path}: a symlink loop") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: {e.strerror or e}") from None
    if root is not None and not real.is_relative_to(root):
        raise ModelFormatError(f"{path}: resolves to {real}, outside the model folder; refusing it")
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise ModelFormatError(f"{path}: {kind}")
    return path


def folder_file(path: Path, contained: bool = False) -> Path:
    """A file of a model folder (``path.parent``): a regular file, and with ``contained`` one that
    resolves inside the folder (see above)."""
    return regular_file(path, folder_root(Path(path).parent) if contained else None)


def read_folder_file(path: Path, limit: int, what: str, contained: bool = False) -> bytes:
    """The bytes of a model folder's file, at most ``limit`` of them (counted as read: a size the
    file system reports is not trusted)."""
    folder_file(path, contained)
    try:  # (O_NONBLOCK: a FIFO put in its place since the check does not block the open)
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ModelFormatError(f"{path}: not a regular file")
            if st.st_size > limit:  # (and a file growing meanwhile stops at limit + 1 below)
                raise ModelFormatError(f"{path}: {st.st_size} bytes is too large for a {what}")
            data = f.read(limit + 1)
    except OSError as e:
        raise ModelFormatError(f"{path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise ModelFormatError(f"{path}: more than {limit} bytes is too large for a {what}")
    return data


def distinct_files(paths: list[Path]) -> None:
    """Refuse one file reached under two names (hard links, symlinks): joined as two parts, it
    would multiply the output and the work by the number of its names."""
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        st = os.stat(path)
        other = seen.setdefault((st.st_dev, st.st_ino), path)
        if other is not path:
            raise ModelFormatError(f"{path}: the same file as {other} (a link); refusing one checkpoint "
                                   "counted twice")
