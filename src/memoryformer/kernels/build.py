"""Build the C++ kernels now: `python -m memoryformer.kernels.build` (scripts/install.sh runs it).

Prints one line: that the kernels are being built (or are already built, or why they cannot be),
so the first model run does not compile. Exit status 0, also where there is no C++ toolchain or the
build fails (the pure-PyTorch path works everywhere); 1 where MEMORYFORMER_REQUIRE_KERNELS=1 is set,
a toolchain exists and the build fails. See docs/kernels.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from memoryformer.kernels import _loader


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m memoryformer.kernels.build",
        description="Build (or check) the C++ Memory Layer kernels of this environment and checkout. "
        "MEMORYFORMER_KERNELS_CACHE sets the cache root, MEMORYFORMER_REQUIRE_KERNELS=1 makes a failed "
        "build an error where a C++ toolchain exists.",
    )


def build() -> int:
    """Build or load the kernels; returns the exit status (see the module docstring)."""
    missing = _loader.toolchain_missing()
    if missing:
        print(f"memoryformer: not building the C++ kernels ({missing}); the pure-PyTorch path will be used",
              file=sys.stderr)
        return 0
    ready = _loader._built_library(_loader.cache_dir()) is not None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # reported below in one line
            ok = _loader.load()
    except _loader.KernelBuildError as exc:
        print(f"memoryformer.kernels.build: error: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"memoryformer: could not build the C++ kernels ({_loader._summary(_loader.last_error())}); "
              "the pure-PyTorch path will be used (docs/kernels.md)", file=sys.stderr)
    elif ready:
        print(f"memoryformer: the C++ kernels are already built in {_loader.cache_dir()}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    _parser().parse_args(argv)
    return build()


if __name__ == "__main__":
    sys.exit(main())
