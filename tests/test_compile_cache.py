"""The commands' persistent compilation cache: where it goes, and that a second process reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flax_d2v import compile_cache


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("D2V_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == tmp_path / "flax-d2v" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")  # JAX's own variable governs
    assert compile_cache.cache_dir() is None
    monkeypatch.setenv("D2V_COMPILATION_CACHE", str(tmp_path / "mine"))  # ours wins over JAX's
    assert compile_cache.cache_dir() == tmp_path / "mine"
    for off in ("off", "0", ""):
        monkeypatch.setenv("D2V_COMPILATION_CACHE", off)
        assert compile_cache.cache_dir() is None and compile_cache.enable() is None


def test_unwritable_directory_leaves_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert compile_cache.enable(blocker / "cache") is None


# A program that takes over MIN_COMPILE_SECONDS to compile on any CPU: a long unrolled chain.
PROGRAM = """
import sys, time, jax, jax.numpy as jnp
from flax_d2v import compile_cache
compile_cache.enable(sys.argv[1])
def f(x):
    for i in range(1500):
        x = jnp.sin(x * (1.0 + i * 1e-4)) + x
    return x
t = time.perf_counter()
jax.jit(f).lower(jnp.ones(8)).compile()
print(time.perf_counter() - t)
"""


def test_second_process_reads_the_compiled_program(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("D2V_COMPILATION_CACHE", None)

    def run() -> float:
        out = subprocess.run(
            [sys.executable, "-c", PROGRAM, str(cache)], env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr
        return float(out.stdout.strip().splitlines()[-1])

    first = run()
    entries = [p for p in Path(cache).rglob("*") if p.is_file()]
    assert first >= compile_cache.MIN_COMPILE_SECONDS, f"test program compiled in {first:.2f} s: make it longer"
    assert entries, "nothing was written to the cache"
    second = run()
    assert second < first / 2, f"second compile {second:.2f} s vs first {first:.2f} s: the cache was not read"
