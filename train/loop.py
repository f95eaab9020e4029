"""The one training loop: any `Objective`, on any mesh (or under pmap), resumable, logged.

    trainer = Trainer(objective, tx, schedule, mesh, params_axes, LoopConfig(out_dir=..., steps=...))
    state, data_state, start = trainer.start(params, seed)  # or the latest checkpoint in out_dir/checkpoints
    loader.restore(data_state) if data_state else None        # the data position saved with it
    result = trainer.fit(state, loader, start, eval_fn=...)   # a FitResult; saves loader.state() with checkpoints
    trainer.finish()                                          # until cfg.steps, SIGTERM, or an error

`loader` is any `source.DataSource` (the contract that makes resume exact is written there):
`loader.BatchLoader` (grain, worker processes), pretraining's `CroppedBatches`, or another pipeline.

The step is a pure function `train_step(state, batch) -> (state, metrics)` built by
`make_train_step`: the step key is `fold_in(state.rng, state.step)` (the objective draws masks and
dropout per example from it, so no layout changes them), the gradient of the
objective's loss *sum* is divided by the sum of its weights over all micro-batches and devices
(see `objective.py`), then clipped and applied by the optax chain, then the objective updates its
extra state (the EMA teacher). Under `jax.jit` it gets explicit in/out shardings from
`sharding.py` and donates the old state; under `--pmap` the same function runs per device with
`psum` over the `batch` axis.

Preemption: SIGTERM (or SIGINT) sets a flag; at the next step boundary the loop saves a
checkpoint of that step (with the data position), waits for it to be on disk and returns with
`stopped=True`. All processes agree on the stop before any saves. `start` reads the latest
checkpoint's settings first and refuses, in one line, a resume whose settings would change the
state's shapes or the data order (`_check_meta`); tests/test_resume.py checks that a resumed run
logs the unbroken run's losses.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from flax_d2v import paths
from flax_d2v.errors import D2VError
from flax_d2v.train import sharding
from flax_d2v.train.checkpoint import Checkpointer, abstract_like
from flax_d2v.train.metrics import MetricsWriter, plot_history, read_metrics
from flax_d2v.train.objective import Objective
from flax_d2v.train.source import DataSource, HostBatch
from flax_d2v.train.state import TrainState
from flax_d2v.types import Batch, PyTree

PMAP_AXIS = "batch"

# Settings recorded in checkpoints only since some version, with the value every run had before:
# a checkpoint without the flag resumes as if it had recorded that value. (`--bucket-growth`: runs
# batched on a 1.25 geometric ladder before `--num-buckets` existed.)
SETTINGS_BEFORE_RECORDED: dict[str, Any] = {"--bucket-growth": 1.25}


def log(msg: str) -> None:
    """Process 0 prints; the others stay quiet."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- the step
def _split_micro(batch: Batch, k: int) -> Batch:
    """(B, ...) -> (k, B/k, ...) so that micro-batch j holds rows j, k+j, 2k+j, ...

    Interleaving keeps every micro-batch spread over all devices of the data axes.
    """

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum {k}")
        return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def update_gradients(
    objective: Objective,
    params: PyTree,
    extra: PyTree,
    batch: Batch,
    rng: jax.Array,
    step: jax.Array,
    grad_accum: int = 1,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], PyTree]:
    """`(loss sum, weight, metrics, gradient)` of one update, before the optax chain (clipping, AdamW).

    The gradient of the objective's loss sum over all micro-batches (`grad_accum`) and devices
    (`axis_name`), divided by the sum of their weights: what `make_train_step` hands to `tx`, so
    clipping sees the accumulated gradient. A function of its own so that `d2v verify --train`
    compares exactly this gradient with PyTorch's.
    """

    def loss_and_grad(params, extra, batch, rng, step):
        def f(p):
            total, weight, metrics = objective.loss(p, extra, batch, rng, step)
            return total, (weight, metrics)

        (total, (weight, metrics)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return total, weight, metrics, grads

    if grad_accum == 1:
        total, weight, metrics, grads = loss_and_grad(params, extra, batch, rng, step)
    else:
        micro = _split_micro(batch, grad_accum)

        def body(carry, xs):
            mb = xs
            t, w, m, g = loss_and_grad(params, extra, mb, rng, step)
            ct, cw, cm, cg = carry
            return (ct + t, cw + w, jax.tree.map(jnp.add, cm, m), jax.tree.map(jnp.add, cg, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        shapes = jax.eval_shape(lambda: loss_and_grad(params, extra, jax.tree.map(lambda x: x[0], micro), rng, step))
        m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[2])
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), m0, zeros)
        (total, weight, metrics, grads), _ = jax.lax.scan(body, init, micro)
        metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
    if axis_name is not None:
        total, weight, grads = jax.lax.psum((total, weight, grads), axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    denom = jnp.where(weight > 0, weight, 1.0).astype(jnp.float32)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    return total, weight, metrics, grads


def make_train_step(
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
    axis_name: str | None = None,
    return_grads: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure update `(state, batch) -> (state, metrics)`; `axis_name` when run under `pmap`.

    `return_grads`: the metrics also hold `"grads"`, the gradient handed to `tx` (`d2v verify --train`
    compares it with PyTorch's from the same compiled step).
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        total, weight, metrics, grads = update_gradients(
            objective, state.params, state.extra, batch, rng, state.step, grad_accum, axis_name
        )
        denom = jnp.where(weight > 0, weight, 1.0).astype(jnp.float32)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = objective.update_extra(state.extra, params, state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
        out = {
            "loss": total / denom,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "weight": weight,
            **{k: v.astype(jnp.float32) for k, v in metrics.items()},
        }
        if return_grads:
            out["grads"] = grads
        return new_state, out

    return train_step


# ----------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class LoopConfig:
    out_dir: str
    steps: int
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 1000
    keep: int = 3
    keep_best: int = 1
    async_checkpoint: bool = True
    tensorboard: bool = False
    use_pmap: bool = False
    progress: bool = True
    plot_curves: tuple[str, ...] = ("loss",)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # run facts stored in checkpoints


@dataclasses.dataclass
class FitResult:
    state: TrainState
    step: int
    stopped: bool  # True when SIGTERM/SIGINT ended the run early (a checkpoint of `step` is on disk)
    last_eval: dict[str, float] | None


class _StopFlag:
    """SIGTERM/SIGINT -> a flag checked at step boundaries (installed only in the main thread)."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.set and signum == signal.SIGINT:  # a second Ctrl-C: give up on the clean stop
            raise KeyboardInterrupt
        self.set = True
        log(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.set
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([self.set]))))


class Trainer:
    """Owns the mesh layout of the state, the jitted (or pmapped) step and the checkpoints of a run."""

    def __init__(
        self,
        objective: Objective,
        tx: optax.GradientTransformation,
        schedule: optax.Schedule,
        mesh: Mesh,
        params_axes: PyTree,
        cfg: LoopConfig,
        rules: tuple[tuple[str, Any], ...] = sharding.LOGICAL_AXIS_RULES,
    ) -> None:
        self.objective, self.tx, self.schedule, self.mesh, self.cfg = objective, tx, schedule, mesh, cfg
        self.params_axes, self.rules = params_axes, rules
        self.is_main = jax.process_index() == 0
        self.ckpt = Checkpointer(
            paths.join(cfg.out_dir, "checkpoints"),
            keep=cfg.keep,
            keep_best=cfg.keep_best,
            async_save=cfg.async_checkpoint,
        )
        self.writer = MetricsWriter(cfg.out_dir, enabled=self.is_main, tensorboard=cfg.tensorboard)
        self._jit_step = None
        self._pmap_step = None
        self.state_shardings: TrainState | None = None

    # -- layout ---------------------------------------------------------------------------------
    def _context(self):
        import contextlib

        stack = contextlib.ExitStack()
        if not self.cfg.use_pmap:  # pmap (built on shard_map) refuses a context mesh; it needs no rules
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def abstract_state(self, params_shapes: PyTree) -> TrainState:
        """ShapeDtypeStructs of the whole state with their shardings on this mesh (sets `state_shardings`)."""
        opt_shapes = jax.eval_shape(self.tx.init, params_shapes)
        extra_shapes = jax.eval_shape(self.objective.init_extra, params_shapes)
        mesh = self.mesh
        if self.cfg.use_pmap:  # pmap keeps everything replicated; checkpoints hold the global replicated state
            rep = lambda tree: jax.tree.map(lambda _: sharding.replicated(mesh), tree)
            p_sh, o_sh, e_sh = rep(params_shapes), rep(opt_shapes), rep(extra_shapes)
        else:
            p_sh = sharding.logical_to_mesh(self.params_axes, params_shapes, mesh, self.rules)
            opt_axes = sharding.opt_state_logical_axes(self.tx, opt_shapes, self.params_axes)
            o_sh = sharding.logical_to_mesh(opt_axes, opt_shapes, mesh, self.rules)
            extra_axes = self.objective.extra_logical_axes(self.params_axes)
            e_sh = sharding.logical_to_mesh(extra_axes, extra_shapes, mesh, self.rules)
        rng_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        shapes = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params_shapes,
            opt_state=opt_shapes,
            extra=extra_shapes,
            rng=rng_shape,
        )
        self.state_shardings = TrainState(
            step=sharding.replicated(mesh), params=p_sh, opt_state=o_sh, extra=e_sh, rng=sharding.replicated(mesh)
        )
        return abstract_like(shapes, self.state_shardings)

    def put(self, tree: PyTree, shardings: PyTree) -> PyTree:
        """Host (or single-device) arrays -> global arrays laid out as `shardings` (multi-host safe).

        E.g. a teacher loaded from a fairseq checkpoint: `trainer.put(t, trainer.state_shardings.extra)`.
        """

        def put(x, s):
            if isinstance(x, jax.Array) and x.is_fully_addressable is False:
                return jax.device_put(x, s)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

        return jax.tree.map(put, tree, shardings)

    # -- start ----------------------------------------------------------------------------------
    def start(self, params: PyTree, seed: int) -> tuple[TrainState, dict, int]:
        """(state, data position, step): the latest checkpoint in `out_dir` if any, else a fresh state."""
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
        abstract = self.abstract_state(shapes)
        latest = self.ckpt.latest_step()
        if latest is not None:
            self._check_meta(self.ckpt.restore_meta(latest))  # before orbax meets a differently shaped state
            try:
                state, data_state, meta = self.ckpt.restore(latest, abstract)
            except (ValueError, KeyError, TypeError) as e:  # a state shape no recorded setting explains
                first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                raise D2VError(
                    f"{self.ckpt.directory}/{latest}: the checkpoint's state does not fit this run's "
                    f"settings ({first[:200]}); use the run's settings or a new --out"
                ) from None
            log(f"resumed from {self.ckpt.directory}/{latest} (step {latest})")
            self._note_mesh_change(meta.get("mesh"))
            self.writer.truncate_after(latest)
            step = latest
        else:
            sh = self.state_shardings
            with self._context():
                p = self.put(params, sh.params)
                opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(p)
                extra = jax.jit(self.objective.init_extra, out_shardings=sh.extra)(p)
            rng = self.put(np.asarray(jax.random.PRNGKey(seed)), sh.rng)
            state = TrainState(
                step=self.put(np.zeros((), np.int32), sh.step), params=p, opt_state=opt_state, extra=extra, rng=rng
            )
            data_state, step = {}, 0
            self.writer.truncate_after(0)  # rows of an attempt that died before its first checkpoint
        self._log_memory(state)
        return state, data_state, step

    def _check_meta(self, meta: dict) -> None:
        """Refuse, in one line, to resume a run whose state shape or data order the settings would change.

        `meta["settings"]` maps a flag to its resolved value (`run_common.resume_settings`); a value
        written as `{"on": bool, "value": v}` is compared by `on` only (e.g. `--clip-norm`: changing the
        norm is sound, switching clipping on or off changes the optimizer state).
        """
        for key in ("objective", "model_config"):
            if key in meta and key in self.cfg.meta and meta[key] != self.cfg.meta[key]:
                diff = ""
                if isinstance(meta[key], dict) and isinstance(self.cfg.meta[key], dict):
                    old, new = meta[key], self.cfg.meta[key]
                    k = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), None)
                    diff = f" ({k}: {old.get(k)!r} there, {new.get(k)!r} now)" if k is not None else ""
                raise D2VError(
                    f"{self.cfg.out_dir}/checkpoints: the run there has a different {key}{diff}; "
                    f"use a new --out or the same settings to resume"
                )
        saved, now = meta.get("settings") or {}, self.cfg.meta.get("settings") or {}
        if saved:
            saved = {**SETTINGS_BEFORE_RECORDED, **saved}
        for flag in now:
            if flag not in saved:
                continue
            a, b = saved[flag], now[flag]
            same = (a["on"] == b["on"]) if isinstance(a, dict) and isinstance(b, dict) else a == b
            if not same:
                shown = lambda v: v["value"] if isinstance(v, dict) else v
                raise D2VError(
                    f"{self.cfg.out_dir}/checkpoints: the run there was started with {flag} "
                    f"{_flag_value(shown(a))}, this command gives {_flag_value(shown(b))}; it changes the "
                    f"saved state or the data order: resume with {flag} {_flag_value(shown(a))} "
                    f"or use a new --out"
                )

    def mesh_layout(self) -> dict[str, int]:
        """{axis: size} of this run's mesh (pmap: {"pmap": devices}), recorded in every checkpoint."""
        if self.cfg.use_pmap:
            return {"pmap": jax.device_count()}
        return {str(k): int(v) for k, v in self.mesh.shape.items()}

    def _note_mesh_change(self, saved: dict[str, int] | None) -> None:
        """One line when the checkpoint was written on another mesh (elastic resume: the global batch,
        the data order and the per-example randomness do not depend on the mesh, so the run continues)."""
        now = self.mesh_layout()
        if saved is not None and {k: v for k, v in saved.items() if v > 1} != {k: v for k, v in now.items() if v > 1}:
            shown = lambda m: ",".join(f"{k}={v}" for k, v in m.items() if v > 1) or "1 device"
            log(
                f"mesh changed: the checkpoint was written on {shown(saved)} ({math.prod(saved.values())} devices), "
                f"this run has {shown(now)} ({math.prod(now.values())} devices); same global batch and data order"
            )

    def _log_memory(self, state: TrainState) -> None:
        per_dev = sharding.bytes_per_device((state.params, state.opt_state, state.extra))
        total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state, state.extra)))
        if per_dev:
            worst = max(per_dev.values())
            self.memory = {"per_device_bytes": worst, "total_bytes": int(total)}
            log(
                f"{sharding.describe(self.mesh, self.state_shardings.params, state.params)}; params+opt+extra: "
                f"{worst / 2**20:.2f} MiB per device of {total / 2**20:.2f} MiB in all ({worst / total:.3f})"
            )

    # -- steps ----------------------------------------------------------------------------------
    def _compiled_step(self):
        if self._jit_step is None:
            step = make_train_step(self.objective, self.tx, self.schedule, self.cfg.grad_accum)
            self._jit_step = jax.jit(
                step,
                in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh)),
                out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._jit_step

    def _pmapped_step(self):
        if self._pmap_step is None:
            step = make_train_step(self.objective, self.tx, self.schedule, self.cfg.grad_accum, PMAP_AXIS)
            self._pmap_step = jax.pmap(step, axis_name=PMAP_AXIS, donate_argnums=(0,))
        return self._pmap_step

    def device_batch(self, batch: Batch) -> Batch:
        """This process's numpy rows -> what the step takes (global arrays, or (devices, rows, ...) for pmap)."""
        arrays = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if v.dtype == np.int64:
                v = v.astype(np.int32)
            elif v.dtype == np.float64:
                v = v.astype(np.float32)
            arrays[k] = v
        if self.cfg.use_pmap:
            n = jax.local_device_count()
            return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in arrays.items()}
        return sharding.shard_batch(arrays, self.mesh)

    def to_pmap(self, state: TrainState) -> TrainState:
        n = jax.local_device_count()
        host = jax.tree.map(lambda x: np.asarray(jax.device_get(x.addressable_data(0))), state)
        # stacked host copies: pmap places slice i on local device i at the first step
        return jax.tree.map(lambda x: np.broadcast_to(x[None], (n,) + x.shape).copy(), host)

    def from_pmap(self, state: TrainState) -> TrainState:
        """Device 0's copy of a pmapped state as a global replicated state (what checkpoints hold)."""
        host = jax.tree.map(lambda x: np.asarray(x[0]), state)
        return self.put(host, self.state_shardings)

    # -- run ------------------------------------------------------------------------------------
    def fit(
        self,
        state: TrainState,
        loader: DataSource | Iterable[HostBatch],
        start_step: int,
        eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
        data_state: Callable[[], dict] | None = None,
    ) -> FitResult:
        """Train from `start_step` to `cfg.steps` on the batches of `loader`.

        `data_state()` (default: `loader.state` for a `DataSource`) is saved with each checkpoint;
        a plain iterable of batches also trains, but its checkpoints record no data position.
        """
        cfg = self.cfg
        if data_state is None:
            data_state = loader.state if isinstance(loader, DataSource) else dict
        batches = iter(loader)
        if cfg.use_pmap:
            state = self.to_pmap(state)
            step_fn = self._pmapped_step()
        else:
            step_fn = self._compiled_step()
        canonical = (lambda s: self.from_pmap(s)) if cfg.use_pmap else (lambda s: s)
        step = start_step
        pending: list[dict[str, jax.Array]] = []
        audio_seconds = 0.0
        t0 = time.perf_counter()
        last_eval: dict[str, float] | None = None
        stopped = False
        bar = self._progress(start_step)
        try:
            with _StopFlag() as stop, self._context():
                while step < cfg.steps:
                    batch = next(batches)
                    audio_seconds += float(np.sum(batch.get("seconds", 0.0))) * jax.process_count()
                    state, metrics = step_fn(state, self.device_batch(batch))
                    pending.append(metrics)
                    step += 1
                    if bar is not None:
                        bar.update(1)
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        row = self._log_row(step, pending, time.perf_counter() - t0, audio_seconds)
                        if bar is not None:
                            bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['lr']:.2e}")
                        pending, audio_seconds, t0 = [], 0.0, time.perf_counter()
                        if hasattr(self.objective, "check"):
                            self.objective.check(row, step)
                    do_eval = eval_fn is not None and (
                        step == cfg.steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
                    )
                    metrics_for_ckpt = None
                    if do_eval:
                        last_eval = {k: float(v) for k, v in eval_fn(canonical(state)).items()}
                        self.writer.write({"step": step, **last_eval})
                        log(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                        metrics_for_ckpt = last_eval if "wer" in last_eval else None
                        t0 = time.perf_counter()
                    if stop.agreed():
                        self.save(canonical(state), step, data_state(), metrics_for_ckpt)
                        stopped = True
                        break
                    if step == cfg.steps or do_eval or (cfg.save_every > 0 and step % cfg.save_every == 0):
                        self.save(canonical(state), step, data_state(), metrics_for_ckpt)
        finally:
            if bar is not None:
                bar.close()
            self.ckpt.wait()
        final = canonical(state)
        if stopped:
            log(f"stopped at step {step}; checkpoint saved in {self.ckpt.directory}; run the same command to resume")
        return FitResult(state=final, step=step, stopped=stopped, last_eval=last_eval)

    def save(self, state: TrainState, step: int, data_state: dict, metrics: dict | None = None) -> None:
        meta = {"step": step, "mesh": self.mesh_layout(), **self.cfg.meta}
        self.ckpt.save(step, state, data_state, meta, metrics=metrics)
        self.writer.sync()  # a bucket's metrics.jsonl: the rows up to this checkpoint

    def _progress(self, start: int):
        if not (self.cfg.progress and self.is_main):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.cfg.steps,
            initial=start,
            desc=self.objective.name,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def _log_row(self, step: int, pending: list[dict[str, jax.Array]], seconds: float, audio: float) -> dict:
        host = jax.device_get(pending)
        if self.cfg.use_pmap:
            host = [jax.tree.map(lambda x: np.asarray(x)[0], m) for m in host]
        weights = np.array([float(m["weight"]) for m in host])
        row: dict[str, Any] = {"step": step}
        # the interval's loss is the weighted mean, as if its updates were one big batch
        losses = np.array([float(m["loss"]) for m in host])
        row["loss"] = float(np.sum(losses * weights) / weights.sum()) if weights.sum() > 0 else float(losses.mean())
        row["lr"] = float(host[-1]["lr"])
        for k in host[-1]:
            if k not in ("loss", "lr", "weight"):
                row[k] = float(np.mean([float(m[k]) for m in host]))
        row["steps_per_s"] = len(host) / max(seconds, 1e-9)
        row["audio_s_per_s"] = audio / max(seconds, 1e-9)
        if not all(math.isfinite(row[k]) for k in ("loss", "grad_norm")):
            log(f"step {step}: non-finite loss or gradient norm ({row['loss']}, {row['grad_norm']})")
        self.writer.write(row)
        return row

    def finish(self, title: str = "") -> None:
        """Plot the history (process 0) and close the checkpoint manager and writers."""
        self.ckpt.close()
        self.writer.close()
        if self.is_main and self.writer.path.exists():
            plot_history(
                read_metrics(self.writer.path),
                paths.join(self.cfg.out_dir, "training_curves.png"),
                title,
                curves=self.cfg.plot_curves,
            )


def _flag_value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return "(none)" if v is None else str(v)


def params_bytes_report(state: TrainState) -> dict[str, int]:
    """Per-device bytes of params + optimizer state (+ extra), from the arrays' shardings."""
    return sharding.bytes_per_device((state.params, state.opt_state, state.extra))
