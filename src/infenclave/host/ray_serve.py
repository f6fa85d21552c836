"""infenclave on Ray Serve (`infenclave serve --ray`): more than one machine; untrusted.

Three deployments, one application:

- **ingress** (any node): today's HTTP API, the very `host.server.create_app` with its
  checks, limits and error mapping; only the pool behind it is remote (`_RayPool`).
- **enclave** (nodes with the ``tee`` custom resource): each replica is untrusted host code
  that starts ONE enclave program on its node (`host.enclave_pool.EnclavePool`, one worker:
  the same sandboxed ``python -m infenclave.enclave``, the same frames), gets the model key
  from the owner's key server (attested key release, `host.keyrelease`: no owner at the
  keyboard) and relays that enclave's frames. A replica is ready only once its enclave holds
  the key; a key server that refuses it (another measurement, a debug enclave, ...) leaves
  the replica failing its constructor, and the deployment not ready.
- **backnet** (any node, a GPU on request): the BackNet ONNX with `host.backnet.BackNet`,
  dynamically batched by ``@serve.batch`` (no waiting window, as the local batcher).

Routing, and why it is safe. A request is sealed to one enclave's key, so only that enclave
can open it. Each enclave replica loads exactly one id into Serve's model multiplexing, its
enclave key, at start; the ingress calls ``handle.options(multiplexed_model_id=KEY)``, so the
router sends the call to the replica holding KEY, where the whole request (FrontNet, BackNet
call, Tail) is finished. The router is only a hint: when the holder is busy or unknown it may
pick another replica, and that replica refuses an id it does not own (the multiplexing loader
raises). The ingress then tries again while the key's replica is alive, and otherwise
answers ``unknown_enclave_key`` (attest again), as the local server does for a restarted
worker. A replica that dies while it holds a request gives ``worker_lost``: the client's
existing retry path re-seals to another attested enclave. A replica whose enclave program
ends fails its health check and is replaced (new enclave, new key, key released again).

Attestation lists every enclave: replicas register their key in a small registry actor and
refresh it from Serve's health check (a heartbeat); the ingress asks each live key for
evidence over the client's nonce through the same routed call.

What each part sees: the ingress and the backnet replicas, like the local host, see
ciphertext, IR1 and IR2 only; Ray's object store and the network between nodes carry the
same. Nothing here is in the trusted computing base, and nothing the local server or the
enclave imports imports Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from infenclave.bundle import read_backnet, read_manifest
from infenclave.errors import EnclaveError, ServerError, UsageError, WorkerCrashed, WorkerLost
from infenclave.host.channel import EnclaveRefused
from infenclave.host.enclave_pool import EnclavePool, NotProvisioned, UnknownEnclaveKey
from infenclave.host.metrics import Metrics
from infenclave.host.server import ServerConfig, create_app

__all__ = ["RayOptions", "build_app", "registry", "run_ray"]

logger = logging.getLogger("infenclave.host.ray")

#: Ray namespace of the registry actor (Serve's replicas run in their own).
NAMESPACE = "infenclave"
#: Seconds between Serve's health checks of an enclave replica (each is also a heartbeat).
HEALTH_PERIOD_S = 2.0
#: A registered enclave not heard of for this long is no longer listed.
HEARTBEAT_MAX_AGE_S = 3 * HEALTH_PERIOD_S
#: Routed calls a misrouted request gets while its enclave's replica is alive.
ROUTE_TRIES = 4


@dataclass(frozen=True)
class RayOptions:
    """What `infenclave serve --ray` adds to `ServerConfig`."""

    #: Enclave replicas (fixed count), or the autoscaling floor when `max_enclaves` is larger.
    enclaves: int = 2
    #: Autoscaling ceiling of the enclave deployment; None or <= `enclaves`: no autoscaling.
    max_enclaves: int | None = None
    backnet_replicas: int = 1
    #: GPUs per BackNet replica (0: none); the BackNet uses them with ``--device cuda``.
    backnet_gpus: float = 0.0
    ingress_replicas: int = 1
    #: The custom resource an enclave replica needs (nodes with a TEE declare it).
    tee_resource: str = "tee"
    #: Key-release attempts per replica start before it gives up (then Serve retries it).
    release_attempts: int = 3
    #: Times Serve retries a failing enclave replica constructor before the deployment fails.
    constructor_retries: int = 3
    #: Serve application name (and registry name).
    app_name: str = "infenclave"
    #: Calls one enclave replica holds at once (the enclave runs them one after another).
    enclave_max_ongoing: int = 256


# --- the registry of enclave keys --------------------------------------------------------


@ray.remote(num_cpus=0)
class _Registry:
    """Enclave keys of live replicas, with what each measured at start (untrusted facts)."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._history: list[dict[str, Any]] = []

    def register(self, key_id: str, info: dict[str, Any]) -> None:
        if key_id not in self._entries:
            self._history.append({"key_id": key_id, **info})
        self._entries[key_id] = {**info, "seen": time.monotonic()}

    def drop(self, key_id: str) -> None:
        self._entries.pop(key_id, None)

    def live(self, max_age: float = HEARTBEAT_MAX_AGE_S) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {k: v for k, v in self._entries.items() if now - v["seen"] <= max_age}

    def history(self) -> list[dict[str, Any]]:
        """Every enclave ever registered, in order, with its start timings (benchmarks)."""
        return list(self._history)


def registry(app_name: str) -> Any:
    """The registry actor of *app_name* (created by whichever replica asks first).

    Detached, so that it outlives the replica that created it; `run_ray` removes it.
    """
    return _Registry.options(  # type: ignore[attr-defined]
        name=f"registry-{app_name}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def _bind_replica_server_to_node_address() -> None:
    """Serve 2.60 starts an inter-deployment gRPC server in every replica on all addresses
    (``"[::]:0"``, fixed in ``ray/serve/_private/replica.py``). Bind it to this node's Ray
    address instead (127.0.0.1 in a loopback cluster), the address its callers use, so that a
    replica listens on nothing the rest of the cluster does not. Called in each replica's
    constructor, which runs before that server starts. Ray is pinned; the Ray test lists every
    listening socket of the cluster and fails if this stops working."""
    import importlib

    replica_module: Any = importlib.import_module("ray.serve._private.replica")
    original = replica_module.add_port_to_grpc_server
    if getattr(original, "infenclave_bound", False):
        return
    util: Any = ray.util
    node_ip = str(util.get_node_ip_address())
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def bind(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = host + address[4:]
        return original(server, address)

    bind.infenclave_bound = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = bind


# --- errors across the process boundary --------------------------------------------------

Tagged = tuple[str, Any]


def _tag(exc: BaseException) -> Tagged:
    """A pool failure as plain data: exceptions do not cross Ray with their class intact."""
    if isinstance(exc, UnknownEnclaveKey):
        return ("unknown_enclave_key", str(exc))
    if isinstance(exc, NotProvisioned):
        return ("not_provisioned", str(exc))
    if isinstance(exc, EnclaveRefused):
        return ("enclave_refused", exc.code)
    if isinstance(exc, WorkerCrashed):
        return ("worker_crashed", str(exc))
    if isinstance(exc, (WorkerLost, EnclaveError, TimeoutError)):
        return ("worker_lost", str(exc) or "the enclave stopped before answering")
    return ("unavailable", str(exc))


def _untag(code: str, detail: Any) -> Exception:
    """The pool exception `host.server` maps to the same HTTP answer as the local server."""
    if code == "unknown_enclave_key":
        return UnknownEnclaveKey(str(detail))
    if code == "not_provisioned":
        return NotProvisioned(str(detail))
    if code == "enclave_refused":
        return EnclaveRefused(str(detail))
    if code == "worker_crashed":
        return WorkerCrashed(str(detail))
    if code == "worker_lost":
        return WorkerLost(str(detail))
    return ServerError(str(detail))


# --- the BackNet deployment --------------------------------------------------------------


class BackNetReplica:
    """The BackNet on a (possibly GPU) node: ``@serve.batch`` collects concurrent IR1s."""

    def __init__(self, config: ServerConfig) -> None:
        from infenclave.host.backnet import BackNet

        _bind_replica_server_to_node_address()

        manifest = read_manifest(config.bundle_dir)
        self._net = BackNet(
            read_backnet(config.bundle_dir, manifest), device=config.device, threads=config.backnet_threads
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backnet")
        self.run.set_max_batch_size(config.max_batch)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def run(self, xs: list[np.ndarray]) -> list[list[np.ndarray]]:
        """[IR2, *checked intermediates] for each IR1 (1, C, H, W), run as one batch."""
        batch = xs[0] if len(xs) == 1 else np.concatenate(xs)
        out = await asyncio.get_running_loop().run_in_executor(self._executor, self._net, batch)
        return [[y[i : i + 1] for y in out] for i in range(len(xs))]


class _RemoteBatcher:
    """What `EnclavePool.classify` calls ``batcher.run`` on: the BackNet deployment."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def run(self, x: np.ndarray) -> list[np.ndarray]:
        try:
            outputs: list[np.ndarray] = await self._handle.run.remote(np.array(x))
        except (RayActorError, RayTaskError) as exc:
            raise ServerError(f"the BackNet deployment failed ({type(exc).__name__})") from exc
        return outputs


# --- the enclave deployment --------------------------------------------------------------


def _replica_state(config: ServerConfig) -> Path:
    """A fresh state directory for one replica's enclave.

    Its own sealing secret, so that every replica gets the model key from the key server as
    an enclave on another machine would (nothing sealed is shared through a disk). Under
    ``sim`` the evidence signer stands for the node's hardware key: the node's one is copied
    in, so a key server policy can pin it.
    """
    from infenclave.crypto import ED25519_KEY_SIZE, load_or_create_key_file
    from infenclave.enclave.evidence import SIM_SIGNING_KEY_FILE

    node = Path(config.state_dir).resolve()
    node.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = node / "ray-replicas" / f"{os.getpid()}-{secrets.token_hex(4)}"
    state.mkdir(mode=0o700, parents=True)
    if config.tee == "sim":
        signer = load_or_create_key_file(node / SIM_SIGNING_KEY_FILE, ED25519_KEY_SIZE)
        fd = os.open(state / SIM_SIGNING_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(signer)
    return state


class EnclaveReplica:
    """One enclave program on this node, its key released by the key server, its frames relayed."""

    async def __init__(self, config: ServerConfig, options: RayOptions, backnet: Any) -> None:  # type: ignore[misc]
        _bind_replica_server_to_node_address()
        started = time.perf_counter()
        self._config = config
        self._batcher = None if backnet is None else _RemoteBatcher(backnet)
        self._state = _replica_state(config)
        manifest = read_manifest(config.bundle_dir)
        self._pool = EnclavePool(
            bundle_dir=config.bundle_dir,
            manifest=manifest,
            state_dir=self._state,
            tee=config.tee,
            workers=1,
            metrics=Metrics(),
            enclave_threads=config.enclave_threads,
            request_timeout=config.request_timeout,
            gramine_dir=config.gramine_dir,
            start_timeout=config.worker_start_timeout,
            memory_limit=config.worker_memory,
            max_pixels=config.max_pixels,
        )
        try:
            await self._pool.start()
            worker = self._pool.workers[0]
            enclave_s = time.perf_counter() - started
            if not worker.provisioned:
                await self._release(worker, options.release_attempts)
            ready_s = time.perf_counter() - started
        except BaseException:
            await self._pool.stop()
            shutil.rmtree(self._state, ignore_errors=True)
            raise
        self.key_id = worker.key_id
        await self._enclave(self.key_id)  # the router learns that this replica holds it
        self._info = {
            "pid": os.getpid(),
            "enclave_pid": worker.process.pid,
            "node": ray.get_runtime_context().get_node_id(),
            "tee": worker.tee,
            "enclave_start_s": round(enclave_s, 3),
            "key_release_s": round(ready_s - enclave_s, 3),
            "ready_s": round(ready_s, 3),
            "registered_at": time.time(),
        }
        self._registry = registry(options.app_name)
        await self._registry.register.remote(self.key_id, self._info)
        logger.info("enclave %s ready in %.2f s (key released)", self.key_id[:16], ready_s)

    async def _release(self, worker: Any, attempts: int) -> None:
        """The model key from the key server (challenge, evidence, sealed key), with back-off."""
        from infenclave.host.keyrelease import fetch_sealed_model_key

        if not self._config.keyserver:
            raise UsageError("serve --ray needs --keyserver: enclave replicas get the model key from it")
        last: Exception | None = None
        for attempt in range(max(1, attempts)):
            try:
                sealed = await fetch_sealed_model_key(
                    self._config.keyserver,
                    worker.channel,
                    worker.public_key,
                    self._pool.manifest.model_id,
                    timeout=self._config.request_timeout,
                )
                await self._pool.provision(worker.key_id, sealed)
                return
            except (ServerError, EnclaveError, OSError, TimeoutError) as exc:
                last = exc
                logger.error("key release failed (%s: %s)", type(exc).__name__, exc)
            await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
        raise ServerError(f"the key server did not release the model key to this enclave ({last})")

    @serve.multiplexed(max_num_models_per_replica=4)  # type: ignore[untyped-decorator]
    async def _enclave(self, key_id: str) -> str:
        """The multiplexing loader: this replica "loads" its own enclave key and refuses any
        other (a misrouted request; its sealed body is useless here)."""
        if key_id != getattr(self, "key_id", key_id):
            raise UnknownEnclaveKey("this replica does not hold that enclave key")
        return key_id

    async def _owned(self) -> str:
        key_id = serve.get_multiplexed_model_id()
        await self._enclave(key_id)
        return key_id

    async def evidence(self, nonce: bytes) -> Tagged:
        """("ok", (key id, provisioned, tee, raw evidence, certificates)) for *nonce*."""
        try:
            await self._owned()
            found = await self._pool.evidence(nonce)
            if not found:
                raise WorkerLost("the enclave gave no evidence")
            worker, tee, raw, certificates = found[0]
            return ("ok", (worker.key_id, worker.provisioned, tee, raw, certificates))
        except Exception as exc:  # noqa: BLE001 - every failure goes back as data
            return _tag(exc)

    async def provision(self, body: bytes) -> Tagged:
        try:
            return ("ok", await self._pool.provision(await self._owned(), body))
        except Exception as exc:  # noqa: BLE001
            return _tag(exc)

    async def classify(self, request_id: str, body: bytes) -> Tagged:
        """The whole request here: FrontNet, the BackNet deployment, Tail."""
        try:
            return ("ok", await self._pool.classify(await self._owned(), request_id, body, self._batcher))
        except Exception as exc:  # noqa: BLE001
            return _tag(exc)

    async def check_health(self) -> None:
        """Serve's health check, and the registry heartbeat. The replica is one enclave: if its
        program ended (the pool would start one with another key), Serve replaces it."""
        workers = self._pool.workers
        if not workers or workers[0].key_id != self.key_id or workers[0].channel.closed:
            raise RuntimeError("the enclave program of this replica has ended")
        self._registry.register.remote(self.key_id, self._info)

    async def __del__(self) -> None:
        if not hasattr(self, "key_id"):  # the constructor failed and has cleaned up already
            return
        try:
            self._registry.drop.remote(self.key_id)
        except Exception:  # noqa: BLE001 - shutting down: best effort
            pass
        await self._pool.stop()
        shutil.rmtree(self._state, ignore_errors=True)


# --- the ingress -------------------------------------------------------------------------


@dataclass
class _EnclaveView:
    """What /healthz and /readyz read of a worker, for a remote enclave replica."""

    slot: int
    key_id: str
    provisioned: bool
    process: Any


class _RayPool:
    """The `EnclavePool` interface the HTTP API uses, over the enclave deployment."""

    def __init__(self, handle: Any, app_name: str, timeout: float) -> None:
        self._handle = handle
        self._registry = registry(app_name)
        self._timeout = timeout
        self._live: dict[str, dict[str, Any]] = {}
        self.reprovision_needed: str | None = None
        self.state_error: str | None = None

    async def refresh(self) -> None:
        self._live = await self._registry.live.remote()

    @property
    def workers(self) -> list[_EnclaveView]:
        return [
            _EnclaveView(slot, key, True, SimpleNamespace(pid=info.get("pid", 0)))
            for slot, (key, info) in enumerate(sorted(self._live.items()))
        ]

    @property
    def provisioned(self) -> bool:
        return bool(self._live)

    async def _call(self, key_id: str, method: str, *args: Any) -> Any:
        for _ in range(ROUTE_TRIES):
            call = getattr(self._handle.options(multiplexed_model_id=key_id), method)
            try:
                code, value = await asyncio.wait_for(_awaited(call.remote(*args)), self._timeout)
            except TimeoutError as exc:
                raise WorkerLost("the enclave replica did not answer in time") from exc
            except RayActorError as exc:  # the replica died while it held the call
                raise WorkerLost("the enclave replica stopped while handling this request; attest again") from exc
            except RayTaskError as exc:
                raise ServerError(f"the enclave replica failed ({type(exc).__name__})") from exc
            if code == "ok":
                return value
            if code == "unknown_enclave_key":
                await self.refresh()
                if key_id in self._live:  # misrouted to another replica: route again
                    continue
            raise _untag(code, value)
        self._registry.drop.remote(key_id)  # listed, yet no replica owns it: gone
        raise UnknownEnclaveKey("no enclave replica took this key: attest again")

    async def evidence(self, nonce: bytes) -> list[tuple[Any, str, bytes, bytes | None]]:
        await self.refresh()

        async def one(key_id: str) -> tuple[Any, str, bytes, bytes | None] | None:
            try:
                key, provisioned, tee, raw, certificates = await self._call(key_id, "evidence", nonce)
            except (ServerError, EnclaveError) as exc:
                logger.warning("enclave %s: evidence failed (%s)", key_id[:16], type(exc).__name__)
                return None
            view = SimpleNamespace(key_id=key, public_key=bytes.fromhex(key), provisioned=provisioned)
            return (view, tee, raw, certificates)

        found = await asyncio.gather(*(one(k) for k in sorted(self._live)))
        return [f for f in found if f is not None]

    async def provision(self, key_id: str, sealed_key: bytes) -> int:
        await self._call(key_id, "provision", sealed_key)
        return len(self._live)

    async def classify(self, key_id: str, request_id: str, sealed: bytes, batcher: Any) -> bytes:
        answer: bytes = await self._call(key_id, "classify", request_id, sealed)
        return answer


async def _awaited(response: Any) -> Any:
    return await response


class IngressReplica:
    """The HTTP API (`host.server.create_app`) over the enclave deployment."""

    def __init__(self, config: ServerConfig, options: RayOptions, enclaves: Any) -> None:
        _bind_replica_server_to_node_address()
        self._config, self._options, self._enclaves = config, options, enclaves

    def __serve_build_asgi_app__(self) -> Any:
        config, options, enclaves = self._config, self._options, self._enclaves

        @asynccontextmanager
        async def backend() -> AsyncIterator[tuple[_RayPool, None]]:
            pool = _RayPool(enclaves, options.app_name, config.request_timeout)
            await pool.refresh()

            async def keep_fresh() -> None:  # /healthz and /readyz read the last listing
                while True:
                    await asyncio.sleep(1.0)
                    try:
                        await pool.refresh()
                    except Exception as exc:  # noqa: BLE001 - retried next second
                        logger.warning("registry refresh failed (%s)", type(exc).__name__)

            task = asyncio.create_task(keep_fresh())
            try:
                yield pool, None  # the BackNet is called by the enclave replicas
            finally:
                task.cancel()

        return create_app(config, backend=backend)


# --- the application ---------------------------------------------------------------------


def build_app(config: ServerConfig, options: RayOptions) -> Any:
    """The Serve application: ingress -> enclave replicas -> BackNet."""
    _deployment: Any = serve.deployment  # its overloads do not type keyword-only use
    manifest = read_manifest(config.bundle_dir)
    backnet = None
    if not manifest.whole_model:  # a whole-model bundle has no BackNet to deploy
        gpus = options.backnet_gpus
        backnet = _deployment(
            BackNetReplica,
            name="backnet",
            num_replicas=options.backnet_replicas,
            max_ongoing_requests=max(8, 4 * config.max_batch),
            ray_actor_options={"num_cpus": 0, "num_gpus": gpus},
        ).bind(config)
    scaling: dict[str, Any] = {"num_replicas": options.enclaves}
    if options.max_enclaves is not None and options.max_enclaves > options.enclaves:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.enclaves,
                "max_replicas": options.max_enclaves,
                "target_ongoing_requests": 4,
            }
        }
    enclave = _deployment(
        EnclaveReplica,
        name="enclave",
        max_ongoing_requests=options.enclave_max_ongoing,
        health_check_period_s=HEALTH_PERIOD_S,
        health_check_timeout_s=30,
        max_constructor_retry_count=options.constructor_retries,
        ray_actor_options={"num_cpus": 0, "resources": {options.tee_resource: 1}},
        **scaling,
    ).bind(config, options, backnet)
    ingress = _deployment(
        serve.ingress()(IngressReplica),
        name="ingress",
        num_replicas=options.ingress_replicas,
        max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(config, options, enclave)


def run_ray(config: ServerConfig, options: RayOptions, *, host: str, port: int, address: str | None) -> None:
    """Start (or join, with *address*) a Ray cluster, deploy, and serve until interrupted.

    A cluster started here runs on this machine only, on *host* (127.0.0.1 by default), with
    no dashboard; it declares enough of the ``tee`` resource for the enclave replicas. Joining
    a cluster, the nodes with a TEE declare it themselves (``ray start --resources``).
    """
    import signal
    import threading

    if config.device == "cuda" and options.backnet_gpus <= 0:
        raise UsageError("--device cuda with --ray: give the BackNet GPUs with --ray-backnet-gpus")
    if address:
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    else:
        enclaves = max(options.enclaves, options.max_enclaves or 0)
        ray.init(
            _node_ip_address=host if host in ("127.0.0.1", "localhost") else None,
            namespace=NAMESPACE,
            include_dashboard=False,
            resources={options.tee_resource: enclaves},
            log_to_driver=False,
        )
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(config, options), name=options.app_name, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # DEPLOY_FAILED: Serve gave up on a replica
            raise ServerError(
                f"the Ray Serve deployment failed ({str(exc).splitlines()[0][:200]}); an enclave replica "
                "that never gets the model key is refused by the key server: its audit log says why"
            ) from exc
        print(f"infenclave on Ray Serve: http://{host}:{port} (Ctrl-C stops)", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        try:
            serve.delete(options.app_name)
            ray.kill(ray.get_actor(f"registry-{options.app_name}", namespace=NAMESPACE))
        except Exception:  # noqa: BLE001 - shutting down: best effort
            pass
        if not address:
            stop_serve: Any = serve.shutdown
            stop_serve()
        ray.shutdown()
