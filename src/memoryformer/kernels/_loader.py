"""Lazy build and load of the C++ kernels (memory_kernels.cpp) with torch.utils.cpp_extension.

Nothing compiles at import. The first `load()` compiles into a cache directory (reused by later
processes: about 30-60 s the first time, about 1 s after) and registers the `memoryformer::*` ops;
if that fails (no compiler, no ninja, unsupported platform) it warns once and every later call
returns False, so callers fall back to the pure-PyTorch path.

Environment:
    MEMORYFORMER_KERNELS_CACHE   build directory (default ~/.cache/memoryformer/kernels/<version tag>)
    MEMORYFORMER_KERNELS_VERBOSE=1   show the compiler output
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "memory_kernels.cpp", HERE / "decode_kernels.cpp"]
HEADERS = [HERE / "memory_common.h"]
EXTENSION_NAME = "memoryformer_kernels"
CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-Wno-psabi"]

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ok": False, "error": None}


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


def cache_dir() -> Path:
    """Build directory: $MEMORYFORMER_KERNELS_CACHE or ~/.cache/memoryformer/kernels/<tag>."""
    env = os.environ.get("MEMORYFORMER_KERNELS_CACHE")
    if env:
        return Path(env)
    tag = (f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
           f"-cpu{_cpu_tag()}-src{_source_tag()}")
    return Path.home() / ".cache" / "memoryformer" / "kernels" / tag


def _ops_registered() -> bool:
    return hasattr(torch.ops, "memoryformer") and hasattr(torch.ops.memoryformer, "memory_layer")


def _build() -> None:
    from torch.utils.cpp_extension import load

    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    load(
        name=EXTENSION_NAME,
        sources=[str(p) for p in SOURCES],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("MEMORYFORMER_KERNELS_VERBOSE", "0") == "1",
    )


def load() -> bool:
    """Compile (first time) and load the kernels; True on success. Warns once on failure."""
    if _state["tried"]:
        return bool(_state["ok"])
    with _lock:
        if _state["tried"]:
            return bool(_state["ok"])
        try:
            if not _ops_registered():
                _build()
            from memoryformer.kernels import _register

            _register.register_python_side()
            _state["ok"] = True
        except Exception as exc:  # any build or load failure means: use the pure path
            _state["error"] = exc
            warnings.warn(
                "memoryformer: could not build the C++ Memory Layer kernels "
                f"({type(exc).__name__}: {str(exc).strip()[:500]}); using the pure-PyTorch path. "
                "Install a C++ compiler and ninja, or set MEMORYFORMER_KERNELS=0 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["ok"] = False
        finally:
            _state["tried"] = True
    return bool(_state["ok"])


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
