"""memoryformer.allocator: the process-wide allocator settings the `memoryformer` command applies."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from memoryformer import allocator


def test_defaults_user_values_and_opt_out():
    env: dict[str, str] = {}
    applied = allocator.configure(env)
    assert env["THP_MEM_ALLOC_ENABLE"] == "1" and applied == env
    if allocator.is_glibc():
        assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_TRIM_THRESHOLD_"] == "-1"
    mine = {"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_MMAP_MAX_": "65536"}
    allocator.configure(mine)
    assert mine["THP_MEM_ALLOC_ENABLE"] == "0" and mine["MALLOC_MMAP_MAX_"] == "65536"
    for word in ("0", "off", "False"):
        off = {"MEMORYFORMER_ALLOCATOR": word}
        assert allocator.configure(off) == {} and off == {"MEMORYFORMER_ALLOCATOR": word}


@pytest.mark.skipif(not allocator.is_glibc(), reason="mallopt is glibc's")
def test_mallopt_only_for_what_configure_set(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967296")  # the user's, applied by glibc at start-up
    monkeypatch.delenv("MEMORYFORMER_ALLOCATOR", raising=False)
    allocator.configure()
    assert calls == [(allocator._M_MMAP_MAX, 0)]
    assert allocator.configure({}) and calls == [(allocator._M_MMAP_MAX, 0)]  # another mapping: no mallopt


# Resident memory after freeing a 256 MiB tensor: glibc returns an mmap'd block to the kernel at once;
# with the settings it stays in the heap for the next allocation of that size.
_PROBE = textwrap.dedent("""
    import os, sys
    import torch
    from memoryformer import allocator
    if sys.argv[1] == "configure":
        allocator.configure()
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss()
    t = torch.ones(64 << 20)  # 256 MiB, written
    del t
    print((rss() - before) / 2**20)
""")


@pytest.mark.skipif(not allocator.is_glibc(), reason="the heap settings are glibc's")
def test_freed_memory_stays_for_reuse_only_when_configured():
    def kept(mode: str) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_", "MEMORYFORMER_ALLOC"))}
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                             check=True)
        return float(out.stdout.strip())

    assert kept("default") < 64  # the block went back to the kernel
    assert kept("configure") > 200  # it stayed, so the next step's gradients need no page faults


def test_cli_configures_the_allocator(monkeypatch):
    from memoryformer import cli

    calls = []
    monkeypatch.setattr(allocator, "configure", lambda: calls.append(1) or {})
    assert cli.main([]) == 2  # no verb: help, exit 2
    assert calls == [1]
