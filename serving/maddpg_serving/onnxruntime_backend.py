"""Build Triton's onnxruntime backend for the tritonserver bundled in nvidia-pytriton, from pinned sources.

The wheel's server (Triton 2.51.0, release branch r24.10) ships only the python backend, so the configs Kubernetes
serves (``config.pbtxt``, ``configs/cpu.pbtxt``: ``platform: "onnxruntime_onnx"``) cannot load on it. This module builds
``libtriton_onnxruntime.so`` from the r24.10 sources of Triton's onnxruntime_backend, backend, core and common repositories,
against the ``libonnxruntime.so`` that the onnxruntime wheel already ships (the backend uses only ONNX Runtime's
versioned C API, so the 1.19 header of that release works with any newer library).

    python -m maddpg_serving.onnxruntime_backend build [--sources DIR]   # what `make setup` runs
    python -m maddpg_serving.onnxruntime_backend status

* Sources: the github archives of the pinned commits (:data:`SOURCES`), downloaded once into the cache, or taken from
  ``--sources DIR`` / ``$MADDPG_TRITON_SOURCES`` (a directory holding the same files, e.g. ``../shared/triton-src`` on
  machines without GitHub). Every file is checked against its pinned sha256 before anything is unpacked.
* Prerequisites: cmake >= 3.17, a C++17 compiler, RapidJSON's CMake package (``rapidjson-dev``) and googletest's
  sources (``googletest``; Triton common's CMake always configures its tests). Missing Debian packages are installed
  with apt-get when this runs as root or with password-less sudo; otherwise the build stops with one line naming them.
* Out of tree and idempotent: everything happens under the project's cache directory
  (:func:`maddpg_core.files.cache_root`: ``$MADDPG_CITYLEARN_CACHE``, else ``$XDG_CACHE_HOME/maddpg-citylearn`` or
  ``~/.cache/maddpg-citylearn``; or ``--cache-dir``); the result lands in a directory named after a digest of the
  pinned inputs and the build recipe, so a build that is current does nothing, and every checkout and virtual
  environment on the machine shares it. Concurrent builds wait for each other (a lock file).

How the server then loads it (:func:`assemble_backend_directory`): ``<backends>/onnxruntime/`` holds a copy of the built
library, ``libonnxruntime.so.1`` (a link to the wheel's library) and ``libtritonserver.so`` (a link to the core library
the pytriton wheel renamed, ``nvidia_pytriton.libs/libtritonserver-<hash>.so``; a link, not a copy, so the dynamic
loader sees the library already mapped by the server instead of a second one). The backend's RUNPATH is ``$ORIGIN``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from maddpg_core.errors import MaddpgCitylearnError
from maddpg_core.files import cache_root, sha256_file

log = logging.getLogger(__name__)

RELEASE = "r24.10"             # Triton 2.51.0, the tritonserver bundled in nvidia-pytriton 0.7.0
BACKEND_LIBRARY = "libtriton_onnxruntime.so"
SOURCES_ENV = "MADDPG_TRITON_SOURCES"
# Bump when the recipe (flags, layout of the result) changes: a new digest means a new build.
RECIPE_VERSION = 1
MIN_CMAKE = (3, 17)            # onnxruntime_backend's cmake_minimum_required
DOWNLOAD_TIMEOUT_S = 60


class BackendBuildError(MaddpgCitylearnError):
    """The onnxruntime backend could not be built: a missing prerequisite, a bad source archive, a failed compile."""


@dataclass(frozen=True)
class Source:
    """One pinned input of the build."""

    file: str                  # its name in a sources directory
    url: str                   # where it comes from upstream
    sha256: str
    unpacks_to: str | None     # the directory a tarball unpacks to; None for a single file


def _archive(repository: str, commit: str, sha256: str) -> Source:
    name = repository.split("/")[-1]
    return Source(f"{name}-{RELEASE}.tar.gz", f"https://github.com/{repository}/archive/{commit}.tar.gz", sha256,
                  f"{name}-{commit}")


# The r24.10 heads of Triton's repositories and the C API header of ONNX Runtime 1.19.0 (ORT_API_VERSION 19).
SOURCES = (
    _archive("triton-inference-server/onnxruntime_backend", "17e5cb23a6fbeb37282eb7079dd0b580cd79530d",
             "72ab7f19151945616601e25ca6087902ee674837c3a9958ff969ec9b1b07af3d"),
    _archive("triton-inference-server/backend", "ac03a5d97403dec841ad46d0439e93db12c9268f",
             "c209191a2a253aeb7b39d62bfece8af04fedc10d4dbd143946e9fe75f6db1f45"),
    _archive("triton-inference-server/core", "bfec7c61dc0939433f64f14e89b1973073eac8ba",
             "f2b4a187acc5c63d336226cb7963b810e7b5f2f8c3c6fd13ab2037d391c82ce2"),
    _archive("triton-inference-server/common", "578491fc3944f77d16a6a38e3d7691c485c47ba0",
             "66d94545b81a10c07fe2a7daf724e46ddbcdc49de14e98b28efd4cd625f00ffd"),
    Source("onnxruntime_c_api.h", "https://raw.githubusercontent.com/microsoft/onnxruntime/v1.19.0/include/onnxruntime/"
           "core/session/onnxruntime_c_api.h", "bfdb387ef6f576ccbeb18c63e19fe5854aa0c278a3838027e9f764419e61475e", None),
)
_BY_REPO = {source.file.removesuffix(f"-{RELEASE}.tar.gz"): source for source in SOURCES if source.unpacks_to}

# CPU only: no CUDA, TensorRT or OpenVINO; everything fetched from the unpacked archives, nothing from the network.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DTRITON_ENABLE_GPU=OFF",
    "-DTRITON_ENABLE_ONNXRUNTIME_TENSORRT=OFF",
    "-DTRITON_ENABLE_ONNXRUNTIME_OPENVINO=OFF",
    f"-DTRITON_BACKEND_REPO_TAG={RELEASE}",
    f"-DTRITON_CORE_REPO_TAG={RELEASE}",
    f"-DTRITON_COMMON_REPO_TAG={RELEASE}",
    "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
    "-DINSTALL_GTEST=OFF",
)


@dataclass(frozen=True)
class Prerequisite:
    what: str                  # in words, for the error line
    debian_package: str
    present: Callable[[], bool]


def build_digest() -> str:
    """Names the result: changes with any pinned input or the recipe, nothing else."""
    recipe = {"recipe": RECIPE_VERSION, "release": RELEASE, "flags": CMAKE_FLAGS,
              "sources": [(s.file, s.sha256) for s in SOURCES]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def install_directory(cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root()) / "triton-backends" / f"onnxruntime-{RELEASE}-{build_digest()}"


def installed(cache_dir: Path | None = None) -> Path | None:
    """The built backend library, if the current recipe's build exists; else None."""
    library = install_directory(cache_dir) / BACKEND_LIBRARY
    return library if library.is_file() else None


# --- prerequisites ------------------------------------------------------------------------------------------------
def _cmake_ok() -> bool:
    cmake = shutil.which("cmake")
    if cmake is None:
        return False
    output = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"(\d+)\.(\d+)", output)
    return bool(found) and tuple(map(int, found.groups())) >= MIN_CMAKE


def compiler() -> str | None:
    """A C++ compiler that accepts C++17 (``$CXX`` first), or None."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for candidate in candidates:
        path = shutil.which(candidate)
        if path is None:
            continue
        probe = subprocess.run([path, "-std=c++17", "-x", "c++", "-fsyntax-only", "-"], input=(
            "#include <optional>\nint main() { std::optional<int> x; if constexpr (true) { return 0; } }\n"),
            capture_output=True, text=True)
        if probe.returncode == 0:
            return path
    return None


RAPIDJSON_CONFIGS = (Path("/usr/lib/cmake/RapidJSON/RapidJSONConfig.cmake"),
                     Path("/usr/share/cmake/RapidJSON/RapidJSONConfig.cmake"),
                     Path("/usr/lib/x86_64-linux-gnu/cmake/RapidJSON/RapidJSONConfig.cmake"))
GOOGLETEST_SOURCE = Path("/usr/src/googletest")


def _make_tool() -> bool:
    return shutil.which("ninja") is not None or shutil.which("make") is not None


PREREQUISITES = (
    Prerequisite("cmake >= 3.17", "cmake", _cmake_ok),
    Prerequisite("a C++17 compiler", "g++", lambda: compiler() is not None),
    Prerequisite("make or ninja", "make", _make_tool),
    Prerequisite("RapidJSON's CMake package", "rapidjson-dev", lambda: any(p.is_file() for p in RAPIDJSON_CONFIGS)),
    Prerequisite("googletest's sources (/usr/src/googletest)", "googletest",
                 lambda: (GOOGLETEST_SOURCE / "CMakeLists.txt").is_file()),
)


def missing_prerequisites() -> list[Prerequisite]:
    return [p for p in PREREQUISITES if not p.present()]


def ensure_prerequisites() -> None:
    """Install what is missing from Debian where this process may (root, or sudo without a password); else refuse."""
    missing = missing_prerequisites()
    if not missing:
        return
    packages = sorted({p.debian_package for p in missing})
    installer = _apt_installer()
    if installer is not None:
        log.info("installing Debian packages for the onnxruntime backend build: %s", " ".join(packages))
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [*installer, "install", "-y", "-qq", "--no-install-recommends", *packages]
        if subprocess.run(install, capture_output=True, env=environment).returncode != 0:
            # Package lists may be missing or stale (fresh containers): refresh once and retry.
            subprocess.run([*installer, "update", "-qq"], capture_output=True, env=environment)
            subprocess.run(install, capture_output=True, env=environment)
        missing = missing_prerequisites()
    if missing:
        names = "; ".join(f"{p.what} (Debian: {p.debian_package})" for p in missing)
        command = "apt-get install " + " ".join(sorted({p.debian_package for p in missing}))
        raise BackendBuildError(f"building Triton's onnxruntime backend needs {names}: install it (`{command}`) and "
                                f"rerun `make setup`; until then `serve` uses the python backend")


def _apt_installer() -> list[str] | None:
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return ["apt-get"]
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", "apt-get"]
    return None


# --- sources ------------------------------------------------------------------------------------------------------
def fetch_sources(sources_dir: Path | None, download_dir: Path) -> dict[str, Path]:
    """``{file: path}`` of every pinned source, each verified against its sha256."""
    found = {}
    for source in SOURCES:
        if sources_dir is not None:
            path = sources_dir / source.file
            if not path.is_file():
                raise BackendBuildError(f"{path} is missing: the sources directory must hold "
                                        f"{', '.join(s.file for s in SOURCES)} (or leave out --sources to download them)")
        else:
            path = download_dir / source.file
            if not path.is_file() or sha256_file(path) != source.sha256:
                _download(source, path)
        actual = sha256_file(path)
        if actual != source.sha256:
            raise BackendBuildError(f"{path} has sha256 {actual[:16]}..., not the pinned {source.sha256[:16]}...: "
                                    f"it is not {source.url}; replace it with that file")
        found[source.file] = path
    return found


def _download(source: Source, path: Path) -> None:
    log.info("downloading %s", source.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(source.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise BackendBuildError(f"cannot download {source.url} ({getattr(exc, 'reason', exc)}): pass --sources DIR "
                                f"(or set {SOURCES_ENV}) with the pinned archives, e.g. ../shared/triton-src") from exc
    os.replace(partial, path)


# --- the build ----------------------------------------------------------------------------------------------------
def onnxruntime_library() -> Path:
    """The ``libonnxruntime.so.<version>`` of the onnxruntime wheel in this environment."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendBuildError("the onnxruntime wheel is not installed, and the backend links against its library: "
                                "pip install 'maddpg-citylearn[serve]'") from exc
    libraries = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    if not libraries:
        raise BackendBuildError(f"no libonnxruntime.so.* in {Path(onnxruntime.__file__).parent / 'capi'}: install the "
                                f"onnxruntime wheel from PyPI (onnxruntime-gpu on CUDA hosts)")
    return libraries[-1]


@dataclass(frozen=True)
class BuildResult:
    library: Path
    built: bool                # False: it was current and nothing was done
    seconds: float = 0.0


def build(sources_dir: Path | None = None, cache_dir: Path | None = None, *, force: bool = False,
          progress: bool = True) -> BuildResult:
    """Build (or find current) ``libtriton_onnxruntime.so``; see the module docstring."""
    cache = cache_dir or cache_root()
    target = install_directory(cache)
    if not force and installed(cache) is not None:
        return BuildResult(target / BACKEND_LIBRARY, built=False)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "onnxruntime-backend.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another checkout may be building the same thing right now
        if not force and installed(cache) is not None:
            return BuildResult(target / BACKEND_LIBRARY, built=False)
        started = time.monotonic()
        ensure_prerequisites()
        files = fetch_sources(Path(sources_dir) if sources_dir else None, cache / "triton-src")
        workdir = Path(tempfile.mkdtemp(prefix="onnxruntime-backend-build-", dir=cache))
        try:
            library = _compile(files, workdir, progress)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
            shutil.copy2(library, staging / BACKEND_LIBRARY)
            (staging / "build.json").write_text(json.dumps({
                "release": RELEASE, "digest": build_digest(), "recipe": RECIPE_VERSION, "cmake_flags": CMAKE_FLAGS,
                "sources": [asdict(s) for s in SOURCES], "compiler": compiler(),
                "linked_against": str(onnxruntime_library()), "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }, indent=1) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)  # all or nothing: a half-built backend is never found by installed()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return BuildResult(target / BACKEND_LIBRARY, built=True, seconds=time.monotonic() - started)


def _compile(files: dict[str, Path], workdir: Path, progress: bool) -> Path:
    log.info("unpacking the pinned Triton %s sources", RELEASE)
    sources = workdir / "src"
    sources.mkdir()
    for source in SOURCES:
        if source.unpacks_to:
            with tarfile.open(files[source.file]) as archive:
                archive.extractall(sources, filter="data")
            if not (sources / source.unpacks_to).is_dir():
                raise BackendBuildError(f"{files[source.file]} did not unpack to {source.unpacks_to}/")
    include = workdir / "include"
    include.mkdir()
    shutil.copy2(files["onnxruntime_c_api.h"], include / "onnxruntime_c_api.h")
    # find_library(onnxruntime) wants a file called libonnxruntime.so: the wheel ships only the versioned name.
    lib = workdir / "lib"
    lib.mkdir()
    (lib / "libonnxruntime.so").symlink_to(onnxruntime_library())

    build_dir = workdir / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else ["-G", "Unix Makefiles"]
    configure = [
        "cmake", "-S", str(sources / _BY_REPO["onnxruntime_backend"].unpacks_to), "-B", str(build_dir), *generator,
        f"-DCMAKE_CXX_COMPILER={compiler()}", *CMAKE_FLAGS,
        f"-DTRITON_ONNXRUNTIME_INCLUDE_PATHS={include}", f"-DTRITON_ONNXRUNTIME_LIB_PATHS={lib}",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-COMMON={sources / _BY_REPO['common'].unpacks_to}",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-CORE={sources / _BY_REPO['core'].unpacks_to}",
        f"-DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND={sources / _BY_REPO['backend'].unpacks_to}",
        f"-DFETCHCONTENT_SOURCE_DIR_GOOGLETEST={GOOGLETEST_SOURCE}",
    ]
    log_path = workdir.parent / "onnxruntime-backend-build.log"
    log.info("building Triton's onnxruntime backend (about a minute on 2 cores; log: %s)", log_path)
    with open(log_path, "w") as build_log:
        _run(configure, build_log, log_path, "configuring")
        jobs = str(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
        _run_with_progress(["cmake", "--build", str(build_dir), "--target", "triton-onnxruntime-backend", "-j", jobs],
                           build_log, log_path, progress)
    library = build_dir / BACKEND_LIBRARY
    if not library.is_file():
        raise BackendBuildError(f"the build finished without {BACKEND_LIBRARY}; see {log_path}")
    return library


def _run(command: Sequence[str], log, log_path: Path, what: str) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
        raise BackendBuildError(f"{what} the onnxruntime backend failed: {_last_error(log_path)} (full log: {log_path})")


def _run_with_progress(command: Sequence[str], log, log_path: Path, progress: bool) -> None:
    """Run the compile, a progress bar driven by the build tool's ``[n/total]`` lines."""
    from tqdm.auto import tqdm

    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    step = re.compile(r"^\[\s*(\d+)(?:/(\d+)|%)\]")
    bar = tqdm(total=100, desc="onnxruntime backend", unit="step", disable=not progress, leave=False)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        log.write(line)
        found = step.match(line)
        if found:
            done, total = int(found.group(1)), int(found.group(2) or 100)
            bar.total = total
            bar.n = done
            bar.refresh()
    bar.close()
    if process.wait() != 0:
        log.flush()
        raise BackendBuildError(f"compiling the onnxruntime backend failed: {_last_error(log_path)} (full log: "
                                f"{log_path})")


def _last_error(log_path: Path) -> str:
    lines = Path(log_path).read_text(errors="replace").splitlines()
    errors = [line.strip() for line in lines if "error" in line.lower() and not line.startswith("$")]
    return (errors or [line.strip() for line in lines if line.strip()] or ["no output"])[0][:300]


# --- at run time --------------------------------------------------------------------------------------------------
def assemble_backend_directory(destination: Path, library: Path, tritonserver_library: Path) -> Path:
    """``destination`` (``<backends>/onnxruntime``) as the bundled server needs it; see the module docstring."""
    destination.mkdir(parents=True)
    shutil.copy2(library, destination / BACKEND_LIBRARY)
    (destination / "libonnxruntime.so.1").symlink_to(onnxruntime_library())
    (destination / "libtritonserver.so").symlink_to(tritonserver_library)
    return destination


# --- command line -------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maddpg_serving.onnxruntime_backend",
        description="Build Triton's onnxruntime backend (r24.10) for the tritonserver bundled in nvidia-pytriton, "
                    "from pinned, checksummed sources. `make setup` runs `build`.")
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build it unless the current build exists (about a minute)")
    build_cmd.add_argument("--sources", type=Path, default=os.environ.get(SOURCES_ENV) or None, metavar="DIR",
                           help=f"a directory holding the pinned archives instead of downloading them "
                                f"[default: ${SOURCES_ENV}, else download from GitHub]")
    build_cmd.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                           help="where sources, build and result go [default: $MADDPG_CITYLEARN_CACHE, else "
                                "$XDG_CACHE_HOME/maddpg-citylearn]")
    build_cmd.add_argument("--force", action="store_true", help="rebuild even if the current build exists")
    build_cmd.add_argument("--no-progress", action="store_true")
    status_cmd = commands.add_parser("status", help="say whether the current build exists, and where")
    status_cmd.add_argument("--cache-dir", type=Path, default=None, metavar="DIR")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "status":
        library = installed(args.cache_dir)
        print(f"built: {library}" if library else f"not built (would be {install_directory(args.cache_dir)})")
        return 0 if library else 1
    try:
        result = build(args.sources, args.cache_dir, force=args.force, progress=not args.no_progress)
    except BackendBuildError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if result.built:
        print(f"built Triton's onnxruntime backend in {result.seconds:.0f} s: {result.library}")
    else:
        print(f"Triton's onnxruntime backend is current: {result.library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
