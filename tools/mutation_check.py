"""Does `d2v verify --train` catch one wrong detail? Issue 22's mutations, re-run against the float64 judge.

Each mutation is one wrong detail of the project's training step (the reference, transformers + torch AdamW, is
left alone); `verify_train` must FAIL with it and PASS without it. The checkpoints are tests/test_verify_train.py's
tiny ones, built by its own `_save` (CTC: 6 updates of the test's four real clips; x-vector: 5 updates of its
labelled manifest, as `test_classification_train_parity` builds it).

    PYTHONPATH=$PWD python tools/mutation_check.py --head ctc --mutation none       # the baseline: must PASS
    PYTHONPATH=$PWD python tools/mutation_check.py --head xvector --mutation am_margin
    PYTHONPATH=$PWD python tools/mutation_check.py --head both --mutation all       # each in a fresh process

Most mutations are monkeypatches of the functions `verify_train` reaches (installed for the run, undone after);
`std_biased` edits flax_d2v/heads.py (a linen module's body) before flax_d2v is imported and writes the file back
in a `finally` (if the process is killed: `git checkout -- flax_d2v/heads.py`). Exit 0 when every run came out as
expected (baseline PASS, mutation FAIL), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # conftest / test_verify_train: the tests' own checkpoint builders

# mutation -> (heads it applies to, what it is)
MUTATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "adam_eps": (("ctc", "xvector"), "AdamW eps 1e-6 instead of the recipe's 1e-8 (state.make_optimizer)"),
    "warmup_short": (("ctc", "xvector"), "tri-stage warm-up one update short, hold and decay as they were"),
    "clip_before_accum": (
        ("ctc", "xvector"),
        "each micro-batch's gradient clipped before the accumulation, none after (loop.update_gradients)",
    ),
    "ctc_mean": (("ctc",), "CTC reduction `mean` where the checkpoint's config says `sum`"),
    "ln_no_decay": (("ctc", "xvector"), "LayerNorm scales and biases exempt from weight decay (project side only)"),
    "encoder_trainable": (
        ("ctc", "xvector"),
        "the conv feature encoder in the optimizer's trainable group (state.param_labels)",
    ),
    "encoder_grad": (("ctc", "xvector"), "the conv feature encoder's gradient no longer stopped (module option)"),
    "std_biased": (("xvector",), "statistics pooling's std with /n instead of torch.std's /(n-1) (heads.py)"),
    "am_margin": (("xvector",), "AM-softmax margin 0.35 instead of transformers' 0.4"),
    "am_scale": (("xvector",), "AM-softmax scale 29 instead of transformers' 30"),
}

# source edits: mutation -> (file, the text, what replaces it); the text must occur exactly once
SOURCE_EDITS: dict[str, tuple[str, str, str]] = {
    "std_biased": (
        "flax_d2v/heads.py",
        ".sum(axis=1) / (n - 1.0)  # torch.std: unbiased",
        ".sum(axis=1) / n  # MUTATION: population std",
    ),
}

CTC_STEPS, XVECTOR_STEPS = 6, 5


# ------------------------------------------------------------------------------------------ mutations
@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def source_edit(mutation: str) -> Iterator[None]:
    path, old, new = SOURCE_EDITS[mutation]
    file = REPO / path
    text = file.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{path}: expected exactly one {old!r} to mutate")
    file.write_text(text.replace(old, new))
    try:
        yield
    finally:
        file.write_text(text)


def _optimizer_with(**overrides: Any) -> Callable[..., Any]:
    from flax_d2v.train import state

    return lambda *args, **kwargs: state.make_optimizer(*args, **{**kwargs, **overrides})


def _clip_each_micro_batch(clip: dict[str, float]) -> Callable[..., Any]:
    """`loop.update_gradients` with `optax.clip_by_global_norm` applied to each micro-batch's gradient (its mean
    over the micro-batch's weight, as a PyTorch user clipping before accumulating would) instead of after."""
    import jax
    import jax.numpy as jnp
    import optax

    from flax_d2v.train import loop

    def update_gradients(objective, params, extra, batch, rng, step, grad_accum=1, axis_name=None):
        assert grad_accum > 1 and axis_name is None, "the mutation is written for grad_accum > 1 on one jit"

        def loss_and_grad(mb):
            def f(p):
                total, weight, metrics = objective.loss(p, extra, mb, rng, step)
                return total, (weight, metrics)

            (total, (weight, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
            w = jnp.where(weight > 0, weight, 1.0)
            mean = jax.tree.map(lambda g: g / w, grads)
            scale = jnp.minimum(1.0, clip["norm"] / jnp.maximum(optax.tree.norm(mean), 1e-30))
            return total, weight, metrics, jax.tree.map(lambda g: g * scale, grads)

        micro = loop._split_micro(batch, grad_accum)
        outs = [loss_and_grad(jax.tree.map(lambda x, j=j: x[j], micro)) for j in range(grad_accum)]
        total = sum(o[0] for o in outs)
        weight = sum(o[1] for o in outs)
        metrics = jax.tree.map(lambda *m: sum(m) / grad_accum, *[o[2] for o in outs])
        grads = jax.tree.map(lambda *g: sum(g), *[o[3] for o in outs])
        denom = jnp.where(weight > 0, weight, 1.0).astype(jnp.float32)
        return total, weight, metrics, jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)

    return update_gradients


@contextlib.contextmanager
def mutation_patches(mutation: str) -> Iterator[None]:
    """The monkeypatches of `mutation` (none for the baseline and for source edits)."""
    from flax_d2v import heads
    from flax_d2v.train import classification, finetune_run, loop, schedules, state
    from flax_d2v.train import run_common as common

    with contextlib.ExitStack() as stack:
        if mutation == "adam_eps":
            stack.enter_context(patched(common, "make_optimizer", _optimizer_with(eps=1e-6)))
        elif mutation == "warmup_short":

            def short(name: str, peak: float, total: int, **kw: Any) -> Any:
                w, h, d = schedules.phase_steps(total, kw["phase_ratio"])
                kw.update(warmup_steps=w - 1, hold_steps=h, decay_steps=d)
                return schedules.make_schedule(name, peak, total, **kw)

            stack.enter_context(patched(common, "make_schedule", short))
        elif mutation == "clip_before_accum":
            clip: dict[str, float] = {}

            def no_clip_after(*args: Any, **kwargs: Any) -> Any:
                clip["norm"] = float(kwargs.get("clip_norm", 0.0))  # the last call is verify_train's own
                return state.make_optimizer(*args, **{**kwargs, "clip_norm": 0.0})

            stack.enter_context(patched(common, "make_optimizer", no_clip_after))
            stack.enter_context(patched(loop, "update_gradients", _clip_each_micro_batch(clip)))
        elif mutation == "ctc_mean":
            ctc = finetune_run.CTCObjective
            stack.enter_context(
                patched(finetune_run, "CTCObjective", lambda module, **kw: ctc(module, **{**kw, "reduction": "mean"}))
            )
        elif mutation == "ln_no_decay":

            def decays(path: tuple[Any, ...], value: Any) -> bool:
                return "layer_norm" not in "/".join(str(getattr(k, "key", k)) for k in path)

            stack.enter_context(patched(state, "decays", decays))
            stack.enter_context(patched(common, "make_optimizer", _optimizer_with(weight_decay_exempt=True)))
        elif mutation == "encoder_trainable":
            labels = state.param_labels
            trainable = lambda params, freeze, *rest: labels(params, False, *rest)  # noqa: E731
            stack.enter_context(patched(state, "param_labels", trainable))  # make_optimizer's, not verify_train's
        elif mutation == "encoder_grad":
            options = common.module_options
            stack.enter_context(
                patched(common, "module_options", lambda cfg: {**options(cfg), "freeze_feature_encoder": False})
            )
        elif mutation == "am_margin":
            loss = functools.partial(heads.am_softmax_loss, margin=0.35)
            stack.enter_context(patched(classification, "am_softmax_loss", loss))
        elif mutation == "am_scale":
            loss = functools.partial(heads.am_softmax_loss, scale=29.0)
            stack.enter_context(patched(classification, "am_softmax_loss", loss))
        elif mutation not in ("none", *SOURCE_EDITS):
            raise SystemExit(f"unknown mutation {mutation!r}; choose none or one of {sorted(MUTATIONS)}")
        yield


# ------------------------------------------------------------------------------------------ the checks
class _Factory:
    """tmp_path_factory's `mktemp` for the test's `_save`: one directory per checkpoint under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def checkpoint(head: str, workdir: Path) -> Path:
    """The test's tiny checkpoint of `head` (built once per workdir)."""
    import test_verify_train as t

    d = workdir / head
    if not (d / "config.json").is_file():
        factory = _Factory(workdir)
        if head == "ctc":
            t._save(factory, "ctc", "Data2VecAudioForCTC")
        else:
            tdnn = {"tdnn_dim": (32,) * 4 + (96,), "xvector_output_dim": 16, "initializer_range": 0.2}
            t._save(factory, "xvector", "Data2VecAudioForXVector", biases=False, num_labels=3, **tdnn)
    return d


def run_check(head: str, mutation: str, workdir: Path, steps: int | None = None) -> bool:
    """One verify_train run; prints its summary, its failures and the per-update loss errors. True: as expected."""
    import numpy as np
    import test_verify_train as t
    from conftest import find_speech_dir

    from flax_d2v.train import verify_train as vt

    speech = find_speech_dir()
    if speech is None:
        raise SystemExit("no ../shared/speech (set D2V_SHARED_SPEECH)")
    clips = [str(speech / c) for c in t.CLIPS]
    src = checkpoint(head, workdir)
    with mutation_patches(mutation):
        if head == "ctc":
            result = vt.verify_train(str(src), steps=steps or CTC_STEPS, audio=clips)
        else:
            manifest = workdir / "speakers.tsv"
            rows = [f"{c}\t{'spk' + str(i % 2)}" for i, c in enumerate(clips)]
            manifest.write_text("path\tspeaker\n" + "\n".join(rows) + "\n")
            result = vt.verify_train(
                str(src), steps=steps or XVECTOR_STEPS, manifest=str(manifest), label_column="speaker"
            )
    failures = result.failures()
    expected = not failures if mutation == "none" else bool(failures)
    print(f"=== {head} / {mutation}: {'PASS' if not failures else 'FAIL'} ({'as expected' if expected else 'NOT'})")
    print(vt.summary(result))
    np.set_printoptions(linewidth=200, formatter={"float": "{:.2e}".format})
    print(f"loss rel err per update: {result.loss_errors}; allowed: {result.loss_allowed()}")
    for line in failures:
        print(f"  FAIL {line}")
    return expected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head", choices=("ctc", "xvector", "both"), default="both")
    parser.add_argument("--mutation", default="none", help=f"none, all, or one of {sorted(MUTATIONS)}")
    parser.add_argument("--steps", type=int, help=f"updates (default: {CTC_STEPS} CTC, {XVECTOR_STEPS} x-vector)")
    parser.add_argument("--workdir", help="where the tiny checkpoints are built (default: a temporary directory)")
    args = parser.parse_args()
    heads = ("ctc", "xvector") if args.head == "both" else (args.head,)
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="d2v-mutations-")))
        if args.mutation == "all" or len(heads) > 1:  # each run in a fresh process (source edits, jit caches)
            names = ["none", *MUTATIONS] if args.mutation == "all" else [args.mutation]
            ok = True
            for head in heads:
                for name in names:
                    if name != "none" and head not in MUTATIONS[name][0]:
                        continue
                    cmd = [sys.executable, __file__, "--head", head, "--mutation", name, "--workdir", str(workdir)]
                    cmd += ["--steps", str(args.steps)] if args.steps else []
                    ok &= subprocess.run(cmd, check=False).returncode == 0
            return 0 if ok else 1
        head, name = heads[0], args.mutation
        if name != "none" and name in MUTATIONS:
            print(f"--- {name}: {MUTATIONS[name][1]}")
        edit = source_edit(name) if name in SOURCE_EDITS else contextlib.nullcontext()
        with edit:  # before flax_d2v is imported (run_check imports it)
            return 0 if run_check(head, name, workdir, args.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
