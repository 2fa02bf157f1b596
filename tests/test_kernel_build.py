"""The kernel build (memoryformer.kernels._loader, _lock, build): one cache directory per environment
and checkout, no silent rebuild, one line when building, stale locks taken over, a bounded wait on a
live build that SIGINT/SIGTERM interrupt, MEMORYFORMER_REQUIRE_KERNELS, and the install-time build.

Most tests replace the compiler with a fake one (`fake_build`); two build a real (tiny or broken)
source in a fresh cache directory, in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from memoryformer.kernels import _loader, _lock
from memoryformer.kernels import build as build_cli

SRC = str(Path(_loader.__file__).resolve().parents[2])


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=SRC, MEMORYFORMER_KERNELS_CACHE=str(cache))
    env.pop("MEMORYFORMER_REQUIRE_KERNELS", None)
    return {**env, **extra}


class FakeBuild:
    """Stands in for the compiler and the library loader: counts compiles, records loads, and acts
    like torch's FileBaton (a `lock` file left in the build directory would block it forever)."""

    def __init__(self) -> None:
        self.compiles = 0
        self.loaded: list[Path] = []

    def compile(self, build_dir: Path) -> Path:
        from torch.utils.file_baton import FileBaton

        baton = FileBaton(str(build_dir / _loader.TORCH_LOCK_NAME))
        if not baton.try_acquire():
            raise AssertionError("torch's build lock is taken: the real build would wait forever")
        try:
            self.compiles += 1
            library = build_dir / "fake_kernels.so"
            library.write_bytes(b"fake")
            return library
        finally:
            baton.release()

    def load(self, library: Path) -> None:
        self.loaded.append(library)


@pytest.fixture
def fake_build(tmp_path, monkeypatch) -> FakeBuild:
    monkeypatch.setenv("MEMORYFORMER_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEMORYFORMER_REQUIRE_KERNELS", raising=False)
    monkeypatch.delenv("MEMORYFORMER_KERNELS_WAIT", raising=False)
    fake = FakeBuild()
    monkeypatch.setattr(_loader, "_compile", fake.compile)
    monkeypatch.setattr(_loader, "_load_library", fake.load)
    return fake


@pytest.fixture
def fresh_state(monkeypatch):
    """A loader that has not tried yet and sees no loaded ops; the real state comes back afterwards."""
    saved = _loader._reset_for_tests()
    monkeypatch.setattr(_loader, "_ops_registered", lambda: False)
    yield
    _loader._reset_for_tests(saved)


def _holder(lock_path: Path, hold_s: float = 120.0) -> subprocess.Popen:
    """A live process holding the build flock (and recording its pid); returns once it holds it."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from memoryformer.kernels import _lock
        with _lock.exclusive(Path({str(lock_path)!r}), 0, "holding"):
            print("held", flush=True)
            time.sleep({hold_s})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(lock_path.parent), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=60)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


# ---- the cache key ---------------------------------------------------------------------------------
def test_cache_dir_is_stable_and_under_the_root(fake_build, tmp_path):
    assert _loader.cache_dir() == _loader.cache_dir()
    assert _loader.cache_dir().parent == tmp_path / "cache"


@pytest.mark.parametrize("change", ["python environment", "torch install", "source checkout"])
def test_cache_dir_differs_per_environment_and_checkout(fake_build, monkeypatch, tmp_path, change):
    before = _loader.cache_dir()
    if change == "python environment":
        monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    elif change == "torch install":
        monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-site" / "torch" / "__init__.py"))
    else:
        monkeypatch.setattr(_loader, "HERE", tmp_path / "other-checkout" / "kernels")
    assert _loader.cache_dir() != before
    assert _loader.cache_dir().parent == before.parent


# ---- build once, say so, never rebuild silently ----------------------------------------------------
def test_first_build_prints_one_line_and_later_loads_do_not_build(fake_build, capfd):
    _loader._build()
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "building the C++ kernels once" in err[0] and str(_loader.cache_dir()) in err[0]
    assert fake_build.compiles == 1
    _loader._build()
    assert capfd.readouterr().err == ""
    assert fake_build.compiles == 1
    assert fake_build.loaded == [_loader.cache_dir() / "fake_kernels.so"]


@pytest.mark.parametrize("change", ["sources", "compiler"])
def test_changed_sources_or_settings_rebuild_with_a_line(fake_build, monkeypatch, capfd, change):
    _loader._build()
    capfd.readouterr()
    if change == "sources":
        monkeypatch.setattr(_loader, "_source_tag", lambda: "changed")
    else:
        monkeypatch.setenv("CXX", "clang++")
    _loader._build()
    assert "rebuilding the C++ kernels" in capfd.readouterr().err
    assert fake_build.compiles == 2


def test_missing_library_or_corrupt_stamp_rebuilds(fake_build):
    _loader._build()
    (_loader.cache_dir() / "fake_kernels.so").unlink()
    _loader._build()
    (_loader.cache_dir() / _loader.STAMP_NAME).write_text("{not json")
    _loader._build()
    assert fake_build.compiles == 3


# ---- locks -----------------------------------------------------------------------------------------
def test_stale_locks_of_a_killed_build_are_taken_over(fake_build, capfd):
    build_dir = _loader.cache_dir()
    build_dir.mkdir(parents=True)
    (build_dir / _loader.TORCH_LOCK_NAME).write_text("")  # torch's FileBaton file, never removed
    (build_dir / _loader.LOCK_NAME).write_text(f"{_dead_pid()}\n")
    _loader._build()
    assert fake_build.compiles == 1
    assert not (build_dir / _loader.TORCH_LOCK_NAME).exists()
    assert _lock.holder_pid(build_dir / _loader.LOCK_NAME) == os.getpid()
    assert "removed the lock file of an interrupted kernel build" in capfd.readouterr().err


def test_a_live_build_is_waited_for_a_bounded_time_with_its_pid(fake_build, monkeypatch, capfd):
    build_dir = _loader.cache_dir()
    build_dir.mkdir(parents=True)
    holder = _holder(build_dir / _loader.LOCK_NAME)
    try:
        monkeypatch.setenv("MEMORYFORMER_KERNELS_WAIT", "1")
        with pytest.raises(_lock.LockTimeout, match=f"waited 1 s for process {holder.pid}"):
            _loader._build()
    finally:
        _stop(holder)
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and f"waiting up to 1 s for process {holder.pid}" in err[0]
    assert "MEMORYFORMER_KERNELS_WAIT" in err[0]
    assert fake_build.compiles == 0


def test_a_timed_out_wait_falls_back_with_the_usual_warning(fake_build, fresh_state, monkeypatch):
    build_dir = _loader.cache_dir()
    build_dir.mkdir(parents=True)
    holder = _holder(build_dir / _loader.LOCK_NAME)
    try:
        monkeypatch.setenv("MEMORYFORMER_KERNELS_WAIT", "0")
        with pytest.warns(RuntimeWarning, match=f"could not build.*LockTimeout.*process {holder.pid}.*pure-PyTorch"):
            assert _loader.load() is False
    finally:
        _stop(holder)


def test_the_waiter_uses_the_build_the_holder_finished(fake_build, monkeypatch, tmp_path):
    """The holder finishes the build while we wait: we load its library and compile nothing."""
    build_dir = _loader.cache_dir()
    build_dir.mkdir(parents=True)
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from memoryformer.kernels import _lock, _loader
        build_dir, go = Path({str(build_dir)!r}), Path({str(go)!r})
        with _lock.exclusive(build_dir / _loader.LOCK_NAME, 0, "building"):
            print("held", flush=True)
            while not go.exists():
                time.sleep(0.05)
            (build_dir / "their.so").write_bytes(b"built by the holder")
            _loader._write_stamp(build_dir, build_dir / "their.so")
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], env=_env(tmp_path / "cache"),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    real_try = _lock._try_lock

    def try_lock(fd: int) -> bool:
        got = real_try(fd)
        if not got:
            go.touch()  # we are waiting now: let the holder finish
        return got

    monkeypatch.setattr(_lock, "_try_lock", try_lock)
    try:
        _loader._build()
    finally:
        _stop(holder)
    assert go.exists()
    assert fake_build.compiles == 0 and fake_build.loaded == [build_dir / "their.so"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_interrupt_the_wait_even_under_a_recording_handler(tmp_path, sig):
    """The training loop's handler only records SIGINT/SIGTERM; the wait must still end on one,
    fall back to the pure path, and leave the signal recorded for the loop's checkpoint-and-stop."""
    cache = tmp_path / "cache"
    script = textwrap.dedent("""
        import signal, warnings
        from memoryformer.kernels import _loader
        seen = []
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: seen.append(signal.Signals(signum).name))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = _loader.load()
        print(ok, seen, any("interrupted by" in str(w.message) for w in caught))
    """)
    probe = subprocess.run([sys.executable, "-c", "from memoryformer.kernels import _loader; print(_loader.cache_dir())"],
                           env=_env(cache), capture_output=True, text=True, timeout=120)
    build_dir = Path(probe.stdout.strip())
    build_dir.mkdir(parents=True)
    holder = _holder(build_dir / _loader.LOCK_NAME)
    waiter = subprocess.Popen([sys.executable, "-c", script], env=_env(cache, MEMORYFORMER_KERNELS_WAIT="600"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = iter(waiter.stderr.readline, "")
        line = next((line for line in lines if "waiting up to" in line), "")
        assert f"waiting up to 600 s for process {holder.pid}" in line, line
        waiter.send_signal(sig)
        out, err = waiter.communicate(timeout=120)  # a hang fails here instead of blocking the suite
    finally:
        _stop(waiter)  # first: once the holder is gone a hung waiter would start a real build
        _stop(holder)
    assert waiter.returncode == 0, err
    assert out.split() == ["False", f"['{sig.name}']", "True"], out + err


# ---- settings and MEMORYFORMER_REQUIRE_KERNELS -------------------------------------------------------
@pytest.mark.parametrize("raw", ["soon", "-5", "nan"])
def test_a_bad_wait_setting_is_named(monkeypatch, raw):
    monkeypatch.setenv("MEMORYFORMER_KERNELS_WAIT", raw)
    with pytest.raises(ValueError, match=r"MEMORYFORMER_KERNELS_WAIT=.* must be a number of seconds"):
        _loader.wait_seconds()


def test_require_applies_only_where_a_toolchain_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMORYFORMER_REQUIRE_KERNELS", "1")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert _loader.toolchain_missing() is not None and not _loader.required()
    monkeypatch.setenv("CXX", sys.executable)  # any program on PATH counts as present
    monkeypatch.setattr(_loader, "toolchain_missing", lambda: None)
    assert _loader.required()


def test_a_required_build_that_fails_raises_one_clear_error(fresh_state, monkeypatch):
    def broken_build() -> None:
        raise RuntimeError("Error building extension:\n[1/2] c++ -O3 ...\nmemory_kernels.cpp:1:2: error: broken\n")

    monkeypatch.setattr(_loader, "_build", broken_build)
    monkeypatch.setattr(_loader, "toolchain_missing", lambda: None)
    monkeypatch.setenv("MEMORYFORMER_REQUIRE_KERNELS", "1")
    for _ in range(2):  # every later call fails too, never a silent fallback
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(_loader.KernelBuildError) as info:
                _loader.load()
        message = str(info.value)
        assert "\n" not in message and "memory_kernels.cpp:1:2: error: broken" in message
        assert "MEMORYFORMER_REQUIRE_KERNELS=1" in message


def test_build_command_without_toolchain_says_so_and_succeeds(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MEMORYFORMER_REQUIRE_KERNELS", "1")
    assert build_cli.main([]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "not building the C++ kernels (no C++ compiler" in err[0]


@pytest.mark.parametrize("require", [False, True])
def test_build_command_reports_a_failed_build_in_one_line(fresh_state, monkeypatch, capsys, fake_build, require):
    def broken_build() -> None:
        raise RuntimeError("simulated compiler error: broken")

    monkeypatch.setattr(_loader, "_build", broken_build)
    monkeypatch.setattr(_loader, "toolchain_missing", lambda: None)
    if require:
        monkeypatch.setenv("MEMORYFORMER_REQUIRE_KERNELS", "1")
    assert build_cli.main([]) == (1 if require else 0)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "simulated compiler error: broken" in err[0]
    assert ("memoryformer.kernels.build: error:" in err[0]) == require


# ---- real builds in a fresh cache directory ----------------------------------------------------------
TINY_OP = """
#include <torch/library.h>
int64_t twice(int64_t x) { return 2 * x; }
TORCH_LIBRARY(memoryformer_build_test, m) { m.def("twice(int x) -> int", twice); }
"""


def _build_with(source: Path, cache: Path, *, require: bool = False) -> subprocess.CompletedProcess:
    """`python -m memoryformer.kernels.build` with the loader pointed at `source`, then the op called."""
    script = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from memoryformer.kernels import _loader, _register, build
        _loader.SOURCES, _loader.HEADERS = [Path({str(source)!r})], []
        _register.register_python_side = lambda: None  # the tiny library has none of our ops
        rc = build.main([])
        if rc == 0 and _loader.loaded():
            print(torch.ops.memoryformer_build_test.twice(21))
        sys.exit(rc)
    """)
    env = _env(cache, **({"MEMORYFORMER_REQUIRE_KERNELS": "1"} if require else {}))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def toolchain():
    missing = _loader.toolchain_missing()
    if missing:
        pytest.skip(f"no real build here: {missing}")


def test_real_build_in_a_fresh_cache_builds_once(toolchain, tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_OP)
    first = _build_with(source, tmp_path / "cache")
    assert first.returncode == 0 and first.stdout.split() == ["42"], first.stdout + first.stderr
    assert "building the C++ kernels once" in first.stderr
    (build_dir,) = (tmp_path / "cache").iterdir()
    library = build_dir / f"{_loader.EXTENSION_NAME}.so"
    built_at = library.stat().st_mtime_ns
    second = _build_with(source, tmp_path / "cache")
    assert second.returncode == 0 and second.stdout.split() == ["42"], second.stdout + second.stderr
    assert second.stderr.strip() == f"memoryformer: the C++ kernels are already built in {build_dir}"
    assert library.stat().st_mtime_ns == built_at


@pytest.mark.parametrize("require", [False, True])
def test_real_broken_source_fails_the_build_only_when_required(toolchain, tmp_path, require):
    source = tmp_path / "broken.cpp"
    source.write_text("#error deliberately broken kernel source\n")
    res = _build_with(source, tmp_path / "cache", require=require)
    assert res.returncode == (1 if require else 0), res.stderr
    assert "deliberately broken kernel source" in res.stderr
    assert ("memoryformer.kernels.build: error:" in res.stderr) == require
