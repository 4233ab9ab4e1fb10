"""Files: written so that a reader (a server polling a repository, a crashed run's successor) never sees half of one;
hashed; recognised before a library parses them; and the one cache folder every part of the project shares."""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

# Overrides where everything the project caches goes (the onnxruntime backend build, the trainer's teacher passes).
CACHE_VARIABLE = "MADDPG_CITYLEARN_CACHE"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, mode: int = 0o644) -> Path:
    """Call ``write(handle)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    The file gets ``mode`` (temp files are created 0600): a model repository is read by a server that runs as
    another user (the Triton image's non-root user), and an unreadable config.pbtxt fails the pod at start.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (checkpoints and source archives are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """The project's one cache folder: ``$MADDPG_CITYLEARN_CACHE``, else ``$XDG_CACHE_HOME/maddpg-citylearn``, else
    ``~/.cache/maddpg-citylearn``. Every cache lives under it (``triton-backends/``, ``triton-src/``,
    ``teacher-passes/``), so one variable moves them all."""
    configured = os.environ.get(CACHE_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "maddpg-citylearn"


# A pickle of protocol 2 or later starts with PROTO (0x80) and the protocol number; torch.save's legacy format starts
# with such a pickle (its magic number), its default format is a zip archive.
_PICKLE_PROTOCOLS = {bytes([0x80, protocol]) for protocol in range(2, 6)}


def not_a_torch_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be something ``torch.save`` wrote (e.g. "it is text"), or None when it may be one.

    Read from the first bytes only, before any unpickling: a text file or an image passed as a checkpoint is called
    what it is, not a checkpoint that "would need arbitrary unpickling" (what a pickle loader reports for any bytes).
    """
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "it is empty"
    # A zip's first bytes are a local file header: a truncated archive is still one (its loader says "truncated").
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path) or head[:2] in _PICKLE_PROTOCOLS:
        return None
    text = head.decode("utf-8", errors="replace")
    if "\x00" in text or text.count("\ufffd") > 2:  # a cut multi-byte character at the end is not binary
        return "it is neither a zip archive nor a pickle (the two forms torch.save writes)"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"it is text (starting {first!r})" if first else "it is blank text"
