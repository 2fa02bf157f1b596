"""`memoryformer bench`: run the benchmarks and write their summary (a source checkout's run_all.py).

The benchmark scripts are not part of the installed package: this verb finds them next to `src/` and takes
its options from run_all.py itself, so `memoryformer bench --help` lists the same options.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"  # src/memoryformer/commands/ -> the repo


def run_all_path() -> Path:
    """benchmarks/run_all.py of the source checkout; FileNotFoundError when installed without it."""
    path = BENCHMARKS / "run_all.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the benchmarks live in the source repository, not in "
                                "the installed package; run `memoryformer bench` from a checkout "
                                "(pip install -e .)")
    return path


@functools.cache
def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("memoryformer_run_all", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        path = run_all_path()
    except FileNotFoundError as err:  # before parsing: run_all.py's options are unknown without it
        raise SystemExit(f"memoryformer bench: error: {err}") from None
    _load(path).add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return _load(run_all_path()).run(args, prog="memoryformer bench")
