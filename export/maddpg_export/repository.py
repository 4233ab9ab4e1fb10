"""Write model versions into a Triton model repository so that nobody ever sees half a model.

A version is assembled in a hidden staging directory beside the versions (``.staging-*``, which Triton ignores because
it is not a number), fsynced, then renamed to its number: a polling server sees either no version or a complete one.
Configs are replaced file by file with ``os.replace``. Earlier versions stay on disk for rollback.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from maddpg_core.errors import RepositoryError
from maddpg_core.files import atomic_write
from maddpg_core.layout import PolicyLayout

from .triton_config import DEFAULT_CONFIG, layout_from_model_config, parse_config

STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class WrittenVersion:
    model_dir: Path
    version: int
    files: tuple[Path, ...]


class ModelRepository:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def model_dir(self, model: str) -> Path:
        return self.root / model

    def versions(self, model: str) -> list[int]:
        directory = self.model_dir(model)
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())

    def served_layout(self, model: str) -> PolicyLayout | None:
        """The layout the repository's current ``config.pbtxt`` declares for ``model``, if any."""
        config = self.model_dir(model) / DEFAULT_CONFIG
        if not config.is_file():
            return None
        try:
            return layout_from_model_config(parse_config(config.read_text()))
        except Exception as exc:  # noqa: BLE001 - a damaged config is reported, not silently overwritten
            raise RepositoryError(
                f"{config} cannot be read ({str(exc).splitlines()[0]}); fix or remove it before exporting into it"
            ) from exc

    def check_writable(self, model: str) -> None:
        """Fail before any long work if the model directory cannot be created or written."""
        target = self.model_dir(model)
        probe_parent = target if target.exists() else next((p for p in target.parents if p.exists()), Path("/"))
        if probe_parent.exists() and not probe_parent.is_dir():
            raise RepositoryError(f"{probe_parent} is a file, not a directory: pass --repository DIR")
        if not os.access(probe_parent, os.W_OK | os.X_OK):
            raise RepositoryError(f"cannot write to {probe_parent} (permission denied): pass a writable --repository DIR")

    def next_version(self, model: str) -> int:
        return max(self.versions(model), default=0) + 1

    def write_version(
        self,
        model: str,
        files: dict[str, bytes],
        configs: dict[str, str],
        *,
        version: int | None = None,
        force: bool = False,
    ) -> WrittenVersion:
        """Write ``files`` as a new version and ``configs`` (paths relative to the model directory).

        ``version=None`` picks the next free number. An existing version is replaced only with ``force``.
        """
        self.check_writable(model)
        if version is not None and version < 1:
            raise RepositoryError(f"--version must be a positive integer, got {version}")
        self.check_free(model, version, force)  # before touching anything: a refused export leaves no trace
        directory = self.model_dir(model)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            lock = os.open(directory, os.O_RDONLY)
        except OSError as exc:
            raise RepositoryError(f"cannot write to {directory}: {exc.strerror or exc}; pass a writable --repository") from exc
        try:
            # One export at a time per model (a lock on the directory itself, so no lock file is left behind):
            # numbering is race-free and stale staging directories are safe to delete.
            fcntl.flock(lock, fcntl.LOCK_EX)
            number = self.check_free(model, version, force)
            self._remove_stale_staging(directory)
            return self._commit(directory, number, files, configs)
        finally:
            os.close(lock)

    def check_free(self, model: str, version: int | None, force: bool) -> int:
        """The version number an export would write; raises if it exists and ``force`` is not set."""
        number = self.next_version(model) if version is None else version
        if (self.model_dir(model) / str(number)).exists() and not force:
            raise RepositoryError(
                f"version {number} of {model} already exists in {self.root}: pass --force to replace it, or omit "
                f"--version to write version {self.next_version(model)}"
            )
        return number

    @staticmethod
    def _commit(directory: Path, number: int, files: dict[str, bytes], configs: dict[str, str]) -> WrittenVersion:
        final = directory / str(number)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{number}-", dir=directory))
            staging.chmod(0o755)  # mkdtemp makes it 0700; the server reading the repository may be another user
        except OSError as exc:
            raise RepositoryError(f"cannot write to {directory}: {exc.strerror or exc}; pass a writable --repository") from exc
        try:
            written = []
            for name, data in files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_synced(path, data)
                written.append(final / name)
            _fsync_dir(staging)
            if final.exists():  # --force: swap the old version out, the new one in, then drop the old
                retired = directory / f"{STAGING_PREFIX}retired-{number}-{os.getpid()}"
                os.rename(final, retired)
                os.rename(staging, final)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.rename(staging, final)
            _fsync_dir(directory)
            for relative, text in configs.items():
                atomic_write(directory / relative, _writer(text.encode()))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise RepositoryError(f"writing version {number} into {directory} failed: {exc}") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return WrittenVersion(model_dir=directory, version=number, files=tuple(written))

    @staticmethod
    def _remove_stale_staging(directory: Path) -> None:
        """Staging directories left by an export that was killed: never visible to Triton, safe to delete."""
        for stale in directory.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


def _writer(data: bytes):
    return lambda handle: handle.write(data)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
