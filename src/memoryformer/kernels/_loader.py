"""Build and load of the C++ kernels (memory_kernels.cpp, decode_kernels.cpp) with torch.utils.cpp_extension.

Nothing compiles at import. `scripts/install.sh` builds the kernels once after the pip install
(`python -m memoryformer.kernels.build`); otherwise the first `load()` does (about a minute, with
one line on stderr). Later processes load the built library directly (well under a second). If the
build fails (no compiler, no ninja, unsupported platform) `load()` warns once and returns False, so
callers fall back to the pure-PyTorch path; with MEMORYFORMER_REQUIRE_KERNELS=1 and a C++ toolchain
present it raises KernelBuildError instead. See docs/kernels.md.

One build directory per environment and checkout: its name holds the torch and Python versions and a
digest of the CPU's instruction sets (-march=native), sys.prefix, torch's install directory and the
sources' directory, so two environments or two checkouts never rebuild each other's build. A stamp
file records the sources' digest and build settings of the finished build; a mismatch rebuilds
(incrementally, by ninja). The build holds an flock (`_lock`), so a build killed midway never blocks
later ones, and a wait on a live build is bounded.

Environment:
    MEMORYFORMER_KERNELS_CACHE    root of the build directories (default ~/.cache/memoryformer/kernels)
    MEMORYFORMER_KERNELS_WAIT     seconds to wait for another process's build (default 300)
    MEMORYFORMER_REQUIRE_KERNELS=1   a failed build is an error where a C++ toolchain exists
    MEMORYFORMER_KERNELS_VERBOSE=1   show the compiler output
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from memoryformer.kernels import _lock as build_lock

HERE = Path(__file__).parent
SOURCES = [HERE / "memory_kernels.cpp", HERE / "decode_kernels.cpp"]
HEADERS = [HERE / "memory_common.h"]
EXTENSION_NAME = "memoryformer_kernels"
CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-Wno-psabi"]
LDFLAGS = ["-fopenmp"]
STAMP_NAME = "memoryformer-build.json"
LOCK_NAME = "memoryformer-build.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.file_baton.FileBaton's lock in the build directory
DEFAULT_WAIT_S = 300.0

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


class KernelBuildError(RuntimeError):
    """The kernels could not be built although MEMORYFORMER_REQUIRE_KERNELS=1 and a toolchain exists."""


def _cpu_tag() -> str:
    """Short fingerprint of the CPU's instruction sets: a -march=native build is not portable, so
    machines sharing a home directory must not share a build."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _source_tag() -> str:
    """Fingerprint of the C++ sources and header: a changed header must not reuse an old build."""
    digest = hashlib.sha1()
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _environment() -> dict[str, str]:
    """What a build depends on besides the sources: the CPU, the Python environment, the torch
    install (its absolute paths are written into build.ninja) and where the sources live."""
    return {
        "cpu": _cpu_tag(),
        "python": sys.prefix,
        "torch": str(Path(torch.__file__).resolve().parent),
        "sources": str(HERE.resolve()),
    }


def cache_root() -> Path:
    """$MEMORYFORMER_KERNELS_CACHE, or ~/.cache/memoryformer/kernels."""
    env = os.environ.get("MEMORYFORMER_KERNELS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "memoryformer" / "kernels"


def cache_dir() -> Path:
    """This environment's and checkout's build directory: <cache_root>/torch<v>-py<v>-<digest>."""
    digest = hashlib.sha1(json.dumps(_environment(), sort_keys=True).encode()).hexdigest()[:12]
    version = torch.__version__.replace("+", "_")
    return cache_root() / f"torch{version}-py{sys.version_info.major}{sys.version_info.minor}-{digest}"


def _settings() -> dict[str, object]:
    """The build settings a finished build must match (besides the sources' digest)."""
    return {"cflags": list(CFLAGS), "ldflags": list(LDFLAGS), "cxx": os.environ.get("CXX", ""), "torch": torch.__version__}


def wait_seconds() -> float:
    """How long to wait for another process's build: $MEMORYFORMER_KERNELS_WAIT, default 300 s."""
    raw = os.environ.get("MEMORYFORMER_KERNELS_WAIT", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"MEMORYFORMER_KERNELS_WAIT={raw!r} must be a number of seconds >= 0")
    return value


def toolchain_missing() -> str | None:
    """Why the kernels cannot be built here (no C++ compiler, no ninja), or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (torch.utils.cpp_extension needs it)"
    return None


def required() -> bool:
    """MEMORYFORMER_REQUIRE_KERNELS=1 and a toolchain present: a failed build is an error."""
    flag = os.environ.get("MEMORYFORMER_REQUIRE_KERNELS", "").strip().lower()
    return flag in ("1", "true", "yes", "on") and toolchain_missing() is None


def _ops_registered() -> bool:
    return hasattr(torch.ops, "memoryformer") and hasattr(torch.ops.memoryformer, "memory_layer")


def _read_stamp(build_dir: Path) -> dict | None:
    try:
        stamp = json.loads((build_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _built_library(build_dir: Path) -> Path | None:
    """The finished library in build_dir if it was built from these sources and settings, else None."""
    stamp = _read_stamp(build_dir)
    if stamp is None or stamp.get("sources") != _source_tag() or stamp.get("settings") != _settings():
        return None
    library = build_dir / str(stamp.get("library", ""))
    return library if library.is_file() else None


def _write_stamp(build_dir: Path, library: Path) -> None:
    """Record a finished build (atomically: temp file, fsync, rename)."""
    stamp = {"sources": _source_tag(), "settings": _settings(), "library": library.name,
             "environment": _environment()}
    tmp = build_dir / f"{STAMP_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(stamp, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, build_dir / STAMP_NAME)


def _compile(build_dir: Path) -> Path:
    """Compile with torch.utils.cpp_extension (ninja; incremental) and load; returns the library."""
    from torch.utils.cpp_extension import load as cpp_load

    library = cpp_load(
        name=EXTENSION_NAME,
        sources=[str(p) for p in SOURCES],
        extra_cflags=list(CFLAGS),  # copies: torch appends its own flags to these lists
        extra_ldflags=list(LDFLAGS),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("MEMORYFORMER_KERNELS_VERBOSE", "0") == "1",
    )
    return Path(library)


def _load_library(library: Path) -> None:
    torch.ops.load_library(str(library))


def _announce(build_dir: Path) -> None:
    """The one line a build prints, so that a minute of compiling does not look like a hang."""
    if _read_stamp(build_dir) is None:
        line = f"memoryformer: building the C++ kernels once (about a minute) into {build_dir}"
    else:
        line = f"memoryformer: rebuilding the C++ kernels (sources or build settings changed) in {build_dir}"
    print(line, file=sys.stderr, flush=True)


def _remove_stale_torch_lock(build_dir: Path) -> None:
    """torch's FileBaton `lock` file left by a build that was killed: we hold the build flock, so no
    live memoryformer build owns it; without this every later build would wait on it forever."""
    torch_lock = build_dir / TORCH_LOCK_NAME
    if torch_lock.exists():
        torch_lock.unlink(missing_ok=True)
        print(f"memoryformer: removed the lock file of an interrupted kernel build in {build_dir}",
              file=sys.stderr, flush=True)


def _build() -> None:
    """Load the finished library of this environment, building it first (under the flock) if needed."""
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    library = _built_library(build_dir)
    if library is not None:
        _load_library(library)
        return
    what = f"building the C++ kernels in {build_dir}"
    with build_lock.exclusive(build_dir / LOCK_NAME, wait_seconds(), what):
        library = _built_library(build_dir)  # another process may have finished it while we waited
        if library is not None:
            _load_library(library)
            return
        _remove_stale_torch_lock(build_dir)
        _announce(build_dir)
        _write_stamp(build_dir, _compile(build_dir))


def _summary(exc: BaseException) -> str:
    """One line about a failed build: the compiler's error lines when there are any."""
    text = str(exc).strip()
    errors = [line.strip() for line in text.splitlines() if "error:" in line.lower() and len(line) < 400]
    body = " | ".join(errors[:3]) if errors else " ".join(text.split())[:500]
    return f"{type(exc).__name__}: {body}"


def _unavailable() -> bool:
    """The failed load's result: False, or KernelBuildError where the kernels are required."""
    if required():
        raise KernelBuildError(
            f"could not build the C++ kernels ({_summary(last_error() or RuntimeError())}) "
            "and MEMORYFORMER_REQUIRE_KERNELS=1 is set; see docs/kernels.md "
            "(MEMORYFORMER_KERNELS_VERBOSE=1 shows the compiler output)"
        ) from last_error()
    return False


def load() -> bool:
    """Build (first time) and load the kernels; True on success. Warns once on failure (raises
    KernelBuildError instead when MEMORYFORMER_REQUIRE_KERNELS=1 and a toolchain is present)."""
    if _state["tried"]:
        return True if _state["ok"] else _unavailable()
    with _lock:
        if _state["tried"]:
            return True if _state["ok"] else _unavailable()
        try:
            if not _ops_registered():
                _build()
            from memoryformer.kernels import _register

            _register.register_python_side()
            _state["ok"] = True
        except Exception as exc:  # any build or load failure means: use the pure path
            _state["error"] = exc
            _state["ok"] = False
            if not required():
                warnings.warn(
                    f"memoryformer: could not build the C++ Memory Layer kernels ({_summary(exc)}); "
                    "using the pure-PyTorch path. Install a C++ compiler and ninja, or set "
                    "MEMORYFORMER_KERNELS=0 to silence this (docs/kernels.md).",
                    RuntimeWarning,
                    stacklevel=3,
                )
        finally:
            _state["tried"] = True
    return True if _state["ok"] else _unavailable()


def loaded() -> bool:
    """True if the kernels are loaded (never triggers a build)."""
    return bool(_state["ok"])


def last_error() -> BaseException | None:
    """The exception of a failed build, or None."""
    err = _state["error"]
    return err if isinstance(err, BaseException) else None


def _reset_for_tests(state: dict[str, object] | None = None) -> dict[str, object]:
    """Replace the loader state (for tests simulating a failed build); returns the previous one."""
    previous = dict(_state)
    _state.clear()
    _state.update(state if state is not None else {"tried": False, "ok": False, "error": None})
    return previous
