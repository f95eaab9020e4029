"""The install metadata caps a dependency only where a version is known to break it.

`pip install flax-d2v` in an environment with a newer JAX must not downgrade JAX (and with it the
user's CUDA plugin). The versions below are the newest each dependency was run with by this
project: the GPU checks (bench/results/gpu-h100-run5: JAX 0.11.2, flax 0.12.10, optax 0.2.8) and
the CPU suite (orbax-checkpoint 0.12.8). No version of these is known to break the package, so
none may be capped.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
NEWEST_KNOWN_GOOD = {"jax": "0.11.2", "flax": "0.12.10", "optax": "0.2.8", "orbax-checkpoint": "0.12.8"}
# name -> (first broken version, why); empty: no version of these is known to break the package
KNOWN_BREAKING: dict[str, tuple[str, str]] = {}


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


@pytest.mark.parametrize("name", sorted(NEWEST_KNOWN_GOOD))
def test_dependency_admits_the_newest_version_it_ran_with(name):
    spec = _requirements()[name].specifier
    assert spec.contains(NEWEST_KNOWN_GOOD[name], prereleases=False), f"{name}{spec} refuses {NEWEST_KNOWN_GOOD[name]}"
    caps = [s for s in spec if s.operator in ("<", "<=", "==", "~=", "===")]
    if name in KNOWN_BREAKING:
        assert [(s.operator, s.version) for s in caps] == [("<", KNOWN_BREAKING[name][0])], name
    else:
        assert not caps, f"{name}{spec}: capped, but no version is known to break it"


@pytest.mark.parametrize("name", sorted(NEWEST_KNOWN_GOOD))
def test_installed_version_is_admitted(name):
    """The versions this suite runs on satisfy the metadata (so the README's CPU list is installable)."""
    installed = importlib.metadata.version(name)
    assert _requirements()[name].specifier.contains(installed, prereleases=True), (name, installed)
