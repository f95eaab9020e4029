"""JAX's persistent compilation cache for the `d2v` commands.

Why: on a GPU, compiling the base model's forward costs seconds while running it on two minutes
of audio costs tens of milliseconds, so a second `d2v transcribe` (or a resumed `d2v finetune`)
spends almost all its time recompiling what the first one compiled. XLA can keep compiled
executables on disk keyed by the program, the flags and the device, and JAX reads them back
instead of compiling (MaxText turns this on by default for the same reason).

Where: `$D2V_COMPILATION_CACHE` when set (`0`, `off` or an empty value turn the cache off), else
JAX's own `$JAX_COMPILATION_CACHE_DIR` (JAX reads it; left as it is), else
`$XDG_CACHE_HOME/flax-d2v/jax` (`~/.cache/flax-d2v/jax`). Only programs that took at least
`MIN_COMPILE_SECONDS` to compile are written, so the tiny helper programs do not litter it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

# JAX's own default threshold: programs compiled faster than this are cheaper to recompile than
# to read back.
MIN_COMPILE_SECONDS = 1.0
_OFF = ("", "0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The directory the commands use, or None when the cache is off or JAX's variable governs."""
    value = os.environ.get("D2V_COMPILATION_CACHE")
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flax-d2v" / "jax"


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on the persistent compilation cache (at `path`, or where `cache_dir` says); returns it.

    A directory that cannot be created leaves the cache off: a read-only home must not stop a run.
    """
    target = Path(path).expanduser() if path is not None else cache_dir()
    if target is None:
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return target
