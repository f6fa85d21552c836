"""The attack work as independent tasks, where they run, and where their results are kept.

A task is one attack on one batch of photos at one cut point: for the white-box attack one
restart on a batch of `runner.WHITEBOX_CHUNK` photos, for the decoder one training run that
decodes every photo. It is keyed by (adversary, attack, cut point, photo batch, restart) and
seeded from the assessment seed and that key, never from run order, and it runs torch and ONNX
Runtime single-threaded (on the loaded 2-core machine one thread per process was ~3x faster
than two threads; and a thread count can change the last bits of a float sum). So a task's
result does not depend on where, beside what, or in which order it runs: the in-process, the
process-pool and the Ray executors give the same reconstructions for the same seed.

What a task does not do: judge. The parent process judges each batch as its restarts come
back, in batch order, and decides the early stop from that; speculative tasks that an early
stop made unnecessary are dropped (their results are still stored). So the verdicts and
figures do not depend on the executor either.

`TaskStore` writes each finished task atomically into `OUT/.partial/tasks/`, with a
fingerprint of what determines it (the attacked network's weights, the photo batch's observed
IR, seed, budget, training photos), so that `assess --resume` runs only the missing tasks and
a stored result is never used for other inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infenclave.assess.attacks import decoder as decoder_attack
from infenclave.assess.attacks import whitebox as whitebox_attack
from infenclave.assess.attacks.training_data import TrainingSet
from infenclave.errors import AssessmentError, UsageError
from infenclave.network import Network

TASK_FORMAT = 1  # bump when a task's meaning or stored form changes: old results are recomputed
StepFn = Callable[[int, int], None]
CANCEL_CHECK_STEPS = 5  # a worker looks for its cancel mark this often (a file test: microseconds)


class TaskCancelled(Exception):
    """A running task was told to stop: its cut's verdict was decided without it."""


def _cancellable(mark: str) -> StepFn:
    """An on-step callback that stops the task once `mark` exists (set by the parent)."""

    def check(done: int, _total: int) -> None:
        if done % CANCEL_CHECK_STEPS == 0 and os.path.exists(mark):
            raise TaskCancelled(mark)

    return check


@dataclass(eq=False)
class AttackTask:
    """One unit of attack work; everything it needs except the networks (`AttackContext`)."""

    adversary: str
    attack: str  # "whitebox" | "decoder"
    cut: str
    batch: int  # photo batch index (the decoder's single batch holds every photo)
    restart: int  # white-box restart (formulations alternate); the decoder: 0
    photos: tuple[str, ...]
    seed: int  # from the assessment seed and this key (`runner.derive_seed`)
    budget: int  # white-box: step cap of this restart; decoder: epochs
    observed: np.ndarray = field(repr=False)  # (b, *cut shape) float32: the IRs the host sees

    @property
    def key(self) -> str:
        return f"{self.adversary}/{self.attack}/{self.cut}/b{self.batch}/r{self.restart}"

    def fingerprint(self, context: str) -> str:
        """Everything the result depends on, hashed; `context` covers the networks and photos."""
        doc = {
            "format": TASK_FORMAT,
            "key": self.key,
            "photos": list(self.photos),
            "seed": self.seed,
            "budget": self.budget,
            "observed": hashlib.sha256(np.ascontiguousarray(self.observed, dtype=np.float32).tobytes()).hexdigest(),
            "observed_shape": list(self.observed.shape),
            "context": context,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass
class TaskResult:
    """A finished task: reconstructions (b, H, W, 3) uint8 and the attack's own figures."""

    key: str
    fingerprint: str
    reconstructions: np.ndarray
    ir_error: np.ndarray  # white-box: relative IR error per photo (float64); decoder: empty
    meta: dict[str, Any]
    stored: bool = False  # read back from the task store (a resumed run)


class AttackContext:
    """The networks and photos every task of one assessment shares, sent to each worker once.

    `attack_net` is what the white-box attack differentiates through (the deployed network,
    or the public one for the surrogate-weights adversary); `deployed` answers the decoder's
    queries. Per-cut fronts are built on first use in each process and cached there.
    """

    def __init__(self, attack_net: Network, deployed: Network | None, training: TrainingSet | None) -> None:
        self.attack_net = attack_net
        self.deployed = deployed
        self.training = training
        parts = [attack_net.model.weights_sha256, deployed.model.weights_sha256 if deployed else ""]
        parts += [p.sha256 for p in training.photos] if training is not None else []
        self.identity = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        self._fronts: dict[tuple[str, str], Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fronts"] = {}  # torch copies and ORT sessions are rebuilt in each process
        return state

    def same_objects(self, other: AttackContext) -> bool:
        return (
            self.attack_net is other.attack_net and self.deployed is other.deployed and self.training is other.training
        )

    def run(self, task: AttackTask, on_step: StepFn | None = None) -> TaskResult:
        """Run `task` here, single-threaded (torch and ONNX Runtime), whatever the caller used."""
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._run(task, on_step)
        finally:
            torch.set_num_threads(before)

    def _run(self, task: AttackTask, on_step: StepFn | None) -> TaskResult:
        fp = task.fingerprint(self.identity)
        pre = self.attack_net.model.preprocess
        if task.attack == "whitebox":
            front = self._front("torch", task.cut)
            run = whitebox_attack.invert(
                front,
                task.observed,
                pre,
                steps=task.budget,
                seed=task.seed,
                loss=whitebox_attack.FORMULATIONS[task.restart % len(whitebox_attack.FORMULATIONS)],
                stop_on_plateau=True,
                on_step=on_step,
            )
            rec = whitebox_attack.restart_record(run, task.restart, task.seed, task.budget)
            meta = {k: v for k, v in rec.items() if not k.startswith("_")}
            return TaskResult(task.key, fp, run.reconstructions, run.ir_error, meta)
        if task.attack == "decoder":
            if self.training is None or self.deployed is None:
                raise AssessmentError("the decoder attack has no training photos")
            dec = decoder_attack.train_and_invert(
                self._front("onnx", task.cut),
                task.observed,
                self.training,
                pre.input_hw,
                epochs=task.budget,
                seed=task.seed,
                on_epoch=on_step,
            )
            meta = {
                "epochs": dec.epochs,
                "train_seconds": dec.train_seconds,
                "invert_seconds": dec.invert_seconds,
                "training_photos": dec.training_photos,
                "training_views": dec.training_views,
                "final_train_loss": dec.loss_curve[-1],
            }
            return TaskResult(task.key, fp, dec.reconstructions, np.empty(0), meta)
        raise AssessmentError(f"unknown attack {task.attack!r}")

    def _front(self, kind: str, cut: str) -> Any:
        from infenclave.assess.attacks._front import OnnxFront, torch_front

        if (kind, cut) not in self._fronts:
            if kind == "torch":
                self._fronts[kind, cut] = torch_front(self.attack_net, cut)
            else:
                assert self.deployed is not None
                self._fronts[kind, cut] = OnnxFront(self.deployed, cut, threads=1)
        return self._fronts[kind, cut]


# --- where results are kept ---------------------------------------------------------------


class TaskStore:
    """Finished tasks as files `<key>.npz` in `folder`, each written atomically (temp + rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:120]
        return self.folder / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz"

    def get(self, task: AttackTask, context: str) -> TaskResult | None:
        """The stored result of `task`, or None when there is none for exactly these inputs."""
        path = self.path(task.key)
        fp = task.fingerprint(context)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("fingerprint") != fp:
                    return None  # other inputs: recomputed and overwritten, never mixed in
                return TaskResult(task.key, fp, z["reconstructions"], z["ir_error"], meta["meta"], stored=True)
        except (OSError, KeyError, ValueError):
            return None

    def put(self, result: TaskResult) -> None:
        buf = io.BytesIO()
        meta = json.dumps({"key": result.key, "fingerprint": result.fingerprint, "meta": result.meta})
        np.savez(
            buf,
            reconstructions=result.reconstructions,
            ir_error=result.ir_error,
            meta=np.frombuffer(meta.encode(), dtype=np.uint8),
        )
        path = self.path(result.key)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.npz"))


# --- where tasks run ----------------------------------------------------------------------


class Executor:
    """Runs tasks of one `AttackContext`; `workers` tasks at a time make sense."""

    name = "in-process"
    workers = 1
    steps_progress = True  # progress per optimisation step (only where the task runs here)

    def start(self, context: AttackContext) -> None:
        self._context = context

    def submit(self, task: AttackTask, on_step: StepFn | None = None) -> Future[TaskResult]:
        fut: Future[TaskResult] = Future()
        try:
            fut.set_result(self._context.run(task, on_step))
        except Exception as exc:  # noqa: BLE001 - the future carries it; Ctrl-C goes through
            fut.set_exception(exc)
        return fut

    def cancel(self, task: AttackTask, fut: Future[TaskResult]) -> None:
        """Stop `task`: dropped if not started; if running, it stops at its next check."""
        fut.cancel()

    def close(self, *, interrupted: bool = False) -> None:
        """Stop the workers (at once after Ctrl-C: running tasks are dropped, stored ones kept)."""

    def to_dict(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers}


_WORKER_CONTEXT: AttackContext | None = None


def _init_worker(context: AttackContext) -> None:
    """Pool worker start: Ctrl-C is the parent's to handle; one thread for every library."""
    global _WORKER_CONTEXT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)
    _WORKER_CONTEXT = context


def _run_in_worker(task: AttackTask, mark: str) -> TaskResult:
    if _WORKER_CONTEXT is None:  # pragma: no cover - the initializer always sets it
        raise AssessmentError("attack worker started without its context")
    return _WORKER_CONTEXT.run(task, _cancellable(mark))


class LocalPool(Executor):
    """`workers` local processes (spawned, not forked: the parent already runs ONNX Runtime and
    torch threads), started once per assessment and given the networks once."""

    name = "process-pool"
    steps_progress = False

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self._for: AttackContext | None = None
        self._marks: str | None = None  # a folder: one file per cancelled running task

    def start(self, context: AttackContext) -> None:
        if self._pool is not None and self._for is not None and self._for.same_objects(context):
            return
        self.close()
        import multiprocessing

        self._marks = tempfile.mkdtemp(prefix="infenclave-cancel-")

        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(context,),
        )
        self._for = context

    def submit(self, task: AttackTask, on_step: StepFn | None = None) -> Future[TaskResult]:
        if self._pool is None:
            raise AssessmentError("the attack pool was not started")
        return self._pool.submit(_run_in_worker, task, self._mark(task))

    def _mark(self, task: AttackTask) -> str:
        if self._marks is None:
            raise AssessmentError("the attack pool was not started")
        return os.path.join(self._marks, hashlib.sha256(task.key.encode()).hexdigest()[:16])

    def cancel(self, task: AttackTask, fut: Future[TaskResult]) -> None:
        if not fut.cancel():
            Path(self._mark(task)).touch()

    def close(self, *, interrupted: bool = False) -> None:
        pool, self._pool, self._for = self._pool, None, None
        if pool is None:
            return
        if interrupted:  # do not wait minutes for running restarts: stop their processes
            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(Exception):
                    proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        if self._marks is not None:
            import shutil

            shutil.rmtree(self._marks, ignore_errors=True)
            self._marks = None


def _ray_run(context: AttackContext, task: AttackTask) -> TaskResult:
    return context.run(task)


class RayExecutor(Executor):
    """Tasks as Ray tasks (one CPU each). Without `address`, a private local Ray instance on
    127.0.0.1 only (no dashboard, its own temporary folder), shut down at the end."""

    name = "ray"
    steps_progress = False

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        from infenclave.assess.runtime import cpu_count

        self.address = address
        self._requested = workers or cpu_count()  # a private instance: this process's cores
        self.workers = self._requested
        self._ray: Any = None
        self._fn: Any = None
        self._ref: Any = None
        self._for: AttackContext | None = None
        self._tmp: str | None = None
        self._started_here = False
        self._refs: dict[int, Any] = {}

    def _init(self) -> Any:
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
            else:
                self._tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit 107 bytes
                ray.init(
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    _temp_dir=self._tmp,
                    num_cpus=self._requested,
                    log_to_driver=False,
                    logging_level="ERROR",
                )
                self._started_here = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._fn = ray.remote(num_cpus=1)(_ray_run)
        self._ray = ray
        return ray

    def start(self, context: AttackContext) -> None:
        ray = self._init()
        if self._for is not None and self._for.same_objects(context):
            return
        self._ref = ray.put(context)
        self._for = context

    def submit(self, task: AttackTask, on_step: StepFn | None = None) -> Future[TaskResult]:
        ref = self._fn.remote(self._ref, task)
        fut: Future[TaskResult] = ref.future()
        self._refs[id(fut)] = ref
        fut.add_done_callback(lambda f: self._refs.pop(id(f), None))
        return fut

    def cancel(self, task: AttackTask, fut: Future[TaskResult]) -> None:
        ref = self._refs.get(id(fut))
        if ref is not None and self._ray is not None:
            self._ray.cancel(ref)  # a running task gets KeyboardInterrupt in its worker

    def close(self, *, interrupted: bool = False) -> None:
        ray, self._ray, self._ref, self._for = self._ray, None, None, None
        if ray is not None and self._started_here:
            ray.shutdown()
            self._started_here = False
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def to_dict(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers, "address": self.address or "local (127.0.0.1)"}


def import_ray() -> Any:
    """Ray, or a clear refusal (exit 2) when the optional extra is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError(
            "--ray needs Ray, which is not installed: pip install 'infenclave[ray]' (or run without --ray)"
        ) from exc
    return ray


def make_executor(jobs: int | None = None, *, ray: bool = False, ray_address: str | None = None) -> Executor:
    """`--jobs 1`: in this process; `--jobs N` (default: the cores this process may use): a
    local process pool; `--ray`: Ray tasks. Ray is imported here, only when asked for."""
    from infenclave.assess.runtime import cpu_count

    if jobs is not None and jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if ray or ray_address:
        import_ray()  # refuse before any work
        return RayExecutor(ray_address, jobs)
    n = jobs or cpu_count()
    return Executor() if n == 1 else LocalPool(n)


@contextlib.contextmanager
def running(executor: Executor) -> Iterator[Executor]:
    """Close the executor at the end; at once (workers stopped) on Ctrl-C or an error."""
    try:
        yield executor
    except BaseException:
        executor.close(interrupted=True)
        raise
    executor.close()
