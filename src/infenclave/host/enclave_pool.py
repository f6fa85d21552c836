"""Start, feed and supervise N enclave worker processes (the host side; untrusted).

Identity design: **every worker has its own X25519 key pair**, generated inside it at start
and never stored. The evidence endpoint returns one piece of evidence per worker, each
binding that worker's public key to the client's nonce; a client verifies them all and
seals each request to one of those keys, naming it in a header; the host routes the request
to the worker holding that key (sealing it to one key and sending it to another only makes
the enclave refuse it). Why not one identity key shared through sealed state: the key that
opens users' images would then be long-lived and stored (sealed) on the host's disk, so a
later compromise of the sealing key (trivial under ``sim``) would open recorded traffic;
per-worker in-memory keys die with the worker. The price: a client re-attests after a
worker restart (the SDK does it on the next call), and attests N workers at once.

The **model key**, in contrast, is shared: the owner provisions it once, to one attested
worker; that worker seals it to the enclave identity (measurement-bound) and hands the
sealed blob back; the host stores the blob (``STATE/model-key-<model id>.sealed``) and gives
it to every other worker and to every restarted one, which unseal it themselves. The host
only ever holds the sealed blob.

Supervision: a task per worker slot starts the process, waits for it to end, fails its
in-flight requests with `WorkerLost` (a clear error, never a hang), and starts a new worker
(with back-off if it keeps dying), which unseals the stored model key and serves again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infenclave.errors import EnclaveError, ServerError, VerificationError, WorkerCrashed, WorkerLost
from infenclave.host.cgroup import MemoryLimit
from infenclave.host.channel import ChannelClosed, ChannelTap, EnclaveChannel, EnclaveRefused
from infenclave.host.metrics import Metrics
from infenclave.host.remote import connect_remote, parse_address
from infenclave.protocol.bundle_format import BundleManifest
from infenclave.protocol.frames import (
    SEALED_STATE_UNOPENABLE,
    Frame,
    MsgType,
    tensor_from_frame,
    tensor_meta,
    tensors_meta,
)

__all__ = [
    "EnclavePool",
    "NotProvisioned",
    "UnknownEnclaveKey",
    "Worker",
]

logger = logging.getLogger("infenclave.host.pool")

#: The enclave's error code for a failed (or, after max_failures, any) BackNet check.
BACKNET_CHECK_FAILED = "backnet_check_failed"

#: Seconds a worker may take from spawn to HELLO (imports onnxruntime, numpy, ...).
START_TIMEOUT_S = 60.0
#: The same under SGX, where the enclave is built page by page, every trusted file is hashed
#: as it is opened and the Python sources are compiled (no bytecode is trusted): an estimate
#: until measured on the first SGX run (deploy/gramine/README.md, checklist).
GRAMINE_START_TIMEOUT_S = 300.0
#: Socket buffers large enough that one IR tensor (~100-300 KiB) moves in one go.
_SOCKET_BUFFER = 4 * 1024 * 1024
_TEE_FLAG = {"sim": "sim", "gramine-sgx": "gramine-sgx"}
#: The Gramine manifest's name (deploy/gramine/Makefile) and its fixed mount points.
GRAMINE_MANIFEST = "infenclave-enclave"
#: Exit signals that come from outside a worker (an operator, a supervisor, the system's
#: OOM killer outside the worker's own cgroup): a request it held did not kill it.
_EXTERNAL_SIGNALS = (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP)
#: Seconds to wait for a worker whose channel closed to exit, to learn how it died.
_EXIT_WAIT_S = 5.0


class UnknownEnclaveKey(ServerError):
    """No live worker holds the named enclave key (it restarted, or never existed)."""


class NotProvisioned(ServerError):
    """The model key has not been provisioned yet (or the worker has not unsealed it)."""


@dataclass
class Worker:
    """One running enclave worker, as the host sees it."""

    slot: int
    process: asyncio.subprocess.Process
    channel: EnclaveChannel
    public_key: bytes
    tee: str
    measurement: str | None
    sandbox: dict[str, Any] | None
    provisioned: bool = False
    started_at: float = field(default_factory=time.time)
    #: The worker's memory cgroup (`host.cgroup`), or None when no limit applies.
    cgroup: str | None = None
    #: Set once the process has exited and `crash_cause` is known.
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    #: Why it died when the cause may be a request it held (a crash, its memory limit), or
    #: None when it was killed from outside. Requests it held are retried only in that case.
    crash_cause: str | None = None

    @property
    def key_id(self) -> str:
        """How clients name this worker: its raw public key in hex."""
        return self.public_key.hex()


class EnclavePool:
    """N supervised enclave workers serving one bundle."""

    def __init__(
        self,
        *,
        bundle_dir: Path,
        manifest: BundleManifest,
        state_dir: Path,
        tee: str,
        workers: int,
        metrics: Metrics,
        enclave_threads: int = 1,
        request_timeout: float = 30.0,
        gramine_dir: Path | None = None,
        start_timeout: float | None = None,
        keyserver: str | None = None,
        remote_enclaves: tuple[str, ...] = (),
        memory_limit: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        if tee not in _TEE_FLAG:
            raise ServerError(f"unknown TEE backend {tee!r}")
        if workers < 1:
            raise ServerError("at least one enclave worker is needed")
        self.manifest = manifest
        self.tee = tee
        self._bundle_dir = Path(bundle_dir).resolve()
        self._state_dir = Path(state_dir).resolve()
        self._n = workers
        self._metrics = metrics
        self._threads = enclave_threads
        self._timeout = request_timeout
        self._workers: dict[int, Worker] = {}
        self._gramine_dir = Path(gramine_dir).resolve() if gramine_dir else None
        self._start_timeout = start_timeout or (GRAMINE_START_TIMEOUT_S if tee == "gramine-sgx" else START_TIMEOUT_S)
        if tee == "gramine-sgx":
            self._check_gramine_layout()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._memory_limit = memory_limit
        self._memory: MemoryLimit | None = None
        #: The host's pixel cap, sent in LOAD: the enclave takes the lower of it and its own.
        self._max_pixels = max_pixels
        self._provision_lock = asyncio.Lock()
        #: () for a whole-model bundle: its enclave answers REQUEST with RESULT, never IR1.
        self._ir1_shape = () if manifest.front_end is None else (1, *manifest.front_end.shape)
        self.sealed_key_path = self._state_dir / f"model-key-{manifest.model_id}.sealed"
        #: Why the owner must provision again (a stored sealed key that no longer opens), or
        #: None. Shown by /healthz; cleared by the next successful provisioning.
        self.reprovision_needed: str | None = None
        #: The sealed model key as last provisioned (also on disk unless `state_error`).
        self._sealed_blob: bytes | None = None
        #: Why the state directory could not be written, or None. Shown by /healthz.
        self.state_error: str | None = None
        #: The owner's key-release service (`infenclave keyserver`), or None.
        self._keyserver = keyserver
        #: Enclaves elsewhere (``--enclave HOST:PORT``, `host.remote`): slots after the local ones.
        self._remote = [f"{h}:{p}" for h, p in map(parse_address, remote_enclaves)]
        self._releases: set[asyncio.Task[None]] = set()

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, *, wait: bool = True) -> None:
        """Start the supervisors; with *wait*, return once every worker has loaded the bundle."""
        _make_host_undumpable()
        self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._memory = MemoryLimit(self._memory_limit)
        started = [asyncio.get_running_loop().create_future() for _ in range(self._n + len(self._remote))]
        for slot in range(self._n + len(self._remote)):
            self._tasks.append(asyncio.create_task(self._supervise(slot, started[slot])))
        if wait:
            await asyncio.gather(*started)

    async def stop(self) -> None:
        """Close every channel (workers exit on EOF) and stop supervising."""
        self._stopping = True
        for worker in list(self._workers.values()):
            worker.channel.close()
        tasks = [*self._tasks, *self._releases]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in list(self._workers.values()):
            await _reap(worker.process)
        self._workers.clear()
        if self._memory is not None:
            self._memory.close()

    @property
    def workers(self) -> list[Worker]:
        """Live workers, by slot."""
        return [self._workers[s] for s in sorted(self._workers)]

    @property
    def provisioned(self) -> bool:
        """True once the sealed model key exists (the owner has provisioned)."""
        return self._sealed_blob is not None or self.sealed_key_path.exists()

    def _stored_sealed_key(self) -> bytes | None:
        """The sealed model key: from the state directory, else the copy kept in memory when
        the disk refused it. An unreadable file is logged and treated as absent."""
        try:
            return self.sealed_key_path.read_bytes()
        except FileNotFoundError:
            return self._sealed_blob
        except OSError as exc:
            logger.error("cannot read the sealed model key %s (%s)", self.sealed_key_path, exc)
            return self._sealed_blob

    def _store_sealed_key(self, blob: bytes) -> None:
        """Store the sealed blob; on a full or read-only state directory keep serving from
        the copy in memory (restarted workers still unseal it) and say so in /healthz."""
        self._sealed_blob = blob
        try:
            _write_atomic(self.sealed_key_path, blob)
        except OSError as exc:
            self.state_error = (
                f"the sealed model key could not be stored in {self._state_dir} ({exc.strerror or exc}); "
                "restarted workers get it from memory, but a restarted server needs the model "
                "owner to provision again"
            )
            logger.error("%s", self.state_error)
            return
        self.state_error = None

    async def _supervise(self, slot: int, started: asyncio.Future[None]) -> None:
        failures = 0
        while not self._stopping:
            began = time.monotonic()
            try:
                worker = await self._spawn(slot)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed start is retried, never fatal
                logger.error("worker %d: start failed (%s: %s)", slot, type(exc).__name__, exc)
                worker = None
            if worker is not None:
                self._workers[slot] = worker
                if self._keyserver and not worker.provisioned:
                    task = asyncio.create_task(self._release_key(worker))
                    self._releases.add(task)
                    task.add_done_callback(self._releases.discard)
                self._update_ready()
                if not started.done():
                    started.set_result(None)
                try:
                    await worker.process.wait()
                except asyncio.CancelledError:
                    raise
                finally:
                    self._workers.pop(slot, None)
                    self._update_ready()
                    worker.channel.close()
                    self._record_exit(worker)
                if self._stopping:
                    return
                logger.warning(
                    "worker %d (pid %d) exited with %s (%s); restarting",
                    slot,
                    worker.process.pid,
                    worker.process.returncode,
                    worker.crash_cause or "killed from outside",
                )
                self._metrics.worker_restarted()
            # Back off when a worker keeps dying young, so a crash loop does not spin.
            failures = failures + 1 if time.monotonic() - began < 10 else 0
            await asyncio.sleep(min(0.2 * (2 ** min(failures, 6)), 10.0) if failures else 0.05)

    async def _spawn(self, slot: int) -> Worker:
        if slot >= self._n:  # a remote enclave: connect to it, then the same handshake
            remote, reader, writer = await connect_remote(self._remote[slot - self._n], self._start_timeout)
            return await self._handshake(slot, remote, reader, writer)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (parent, child):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._enclave_command(),
                stdin=child.fileno(),
                stdout=child.fileno(),
                stderr=asyncio.subprocess.PIPE,
                env=_enclave_env(),
                close_fds=True,
                cwd=self._gramine_dir,
            )
        finally:
            child.close()
        if process.stderr is not None:  # the worker's log lines, in the host's log format
            asyncio.get_running_loop().create_task(_relay_log(process.stderr, slot, process.pid))
        cgroup: str | None = f"worker-{slot}-{process.pid}"
        if self._memory is None or not self._memory.attach(str(cgroup), process.pid):
            cgroup = None
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=2**20)
        return await self._handshake(slot, process, reader, writer, cgroup)

    async def _handshake(
        self,
        slot: int,
        process: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cgroup: str | None = None,
    ) -> Worker:
        """HELLO, LOAD and (with a stored sealed key) UNSEAL, for a local or a remote enclave."""
        channel = EnclaveChannel(reader, writer, ChannelTap.from_env(f"worker{slot}"))
        try:
            hello = await channel.hello(self._start_timeout)
            worker = Worker(
                slot=slot,
                process=process,
                channel=channel,
                public_key=bytes.fromhex(hello.meta["public_key"]),
                tee=str(hello.meta["tee"]),
                measurement=hello.meta.get("measurement"),
                sandbox=hello.meta.get("sandbox"),
                cgroup=cgroup,
            )
            load: dict[str, Any] = {"bundle": self._bundle_dir.name}
            if self._max_pixels is not None:
                load["max_pixels"] = self._max_pixels
            loaded = await channel.call(MsgType.LOAD, load, timeout=self._start_timeout)
            if loaded.meta.get("model_id") != self.manifest.model_id:
                raise ServerError("the enclave loaded a different manifest than the host")
            stored = self._stored_sealed_key()
            if stored is not None:
                try:
                    await channel.call(MsgType.UNSEAL, body=stored, timeout=self._start_timeout)
                    worker.provisioned = True
                except EnclaveRefused as exc:
                    if exc.code != SEALED_STATE_UNOPENABLE:
                        raise
                    self._set_aside_sealed_key()  # the worker stays up, unprovisioned
        except BaseException:
            channel.close()
            if process.returncode is None:
                process.kill()
            await _reap(process)
            if cgroup is not None and self._memory is not None:
                self._memory.release(cgroup)
            raise
        logger.info(
            "worker %d: pid %d ready (tee %s, %s)",
            slot,
            process.pid,
            worker.tee,
            "model key unsealed" if worker.provisioned else "waiting for provisioning",
        )
        return worker

    def _enclave_command(self) -> list[str]:
        """``sim``: the enclave program as a sandboxed child process. ``gramine-sgx``: the same
        program inside an SGX enclave, whose arguments are fixed (measured) by the manifest."""
        if self.tee == "gramine-sgx":
            return ["gramine-sgx", GRAMINE_MANIFEST]
        return [
            sys.executable,
            "-m",
            "infenclave.enclave",
            "--tee",
            "sim",
            "--channel",
            "stdio",
            "--bundles",
            str(self._bundle_dir.parent),
            "--state",
            str(self._state_dir),
            "--threads",
            str(self._threads),
        ]

    def _set_aside_sealed_key(self) -> None:
        """The stored sealed model key does not open in this enclave: after a rebuild (another
        MRENCLAVE or measurement), a TCB or microcode update (the SGX sealing key changes with
        CPUSVN), or corruption. Restarting cannot help, so keep the blob (renamed, for a
        rollback) and serve unprovisioned until the owner provisions again."""
        self._sealed_blob = None
        if self.sealed_key_path.exists():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = self.sealed_key_path.with_name(f"{self.sealed_key_path.name}.unopenable-{stamp}")
            os.replace(self.sealed_key_path, aside)
            self.reprovision_needed = (
                f"the stored sealed model key does not open in this enclave (rebuilt enclave, "
                f"TCB or microcode update, or a damaged file); it was set aside as {aside.name}. "
                "The model owner (or the key-release service) must provision the model key again."
            )
            logger.error("%s", self.reprovision_needed)

    def _check_gramine_layout(self) -> None:
        """Under Gramine the enclave reads ``bundles/<name>`` relative to the manifest's folder.

        NOT EXERCISED here (no SGX, no Gramine): the layout follows deploy/gramine's manifest.
        """
        if self._gramine_dir is None:
            raise ServerError(
                "--tee gramine-sgx needs --gramine-dir (the folder holding the "
                "signed infenclave-enclave manifest, see deploy/gramine)"
            )
        # The thread count is measured into the manifest (loader.argv); a different
        # --enclave-threads would be silently ignored, so it must agree.
        manifest_path = self._gramine_dir / f"{GRAMINE_MANIFEST}.manifest"
        try:
            import tomllib

            argv = tomllib.loads(manifest_path.read_text())["loader"]["argv"]
            threads = int(argv[argv.index("--threads") + 1])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise ServerError(
                f"--tee gramine-sgx: cannot read --threads from {manifest_path} (build it with deploy/gramine)"
            ) from exc
        if threads != self._threads:
            raise ServerError(
                f"--enclave-threads {self._threads} differs from the {threads} "
                f"measured into {manifest_path.name} (ENCLAVE_THREADS)"
            )
        expected = self._gramine_dir / "bundles" / self._bundle_dir.name
        if not expected.exists() or expected.resolve() != self._bundle_dir:
            raise ServerError(
                f"--tee gramine-sgx: the bundle must be visible to the enclave as {expected} (link or copy it there)"
            )

    def _update_ready(self) -> None:
        self._metrics.set_workers_ready(sum(1 for w in self._workers.values() if w.provisioned))

    # --- operations ------------------------------------------------------------------------

    def _worker_for(self, key_id: str) -> Worker:
        for worker in self._workers.values():
            if worker.key_id == key_id and not worker.channel.closed:
                return worker
        raise UnknownEnclaveKey("no running enclave holds this key (the worker restarted?): attest again")

    async def evidence(self, nonce: bytes) -> list[tuple[Worker, str, bytes, bytes | None]]:
        """Evidence from every live worker for *nonce*: (worker, tee, raw evidence, SEV-SNP
        certificates as PEM or None)."""
        workers = [w for w in self.workers if not w.channel.closed]

        async def one(worker: Worker) -> tuple[Worker, str, bytes, bytes | None] | None:
            try:
                frame = await worker.channel.call(MsgType.EVIDENCE, {"nonce": nonce.hex()}, timeout=self._timeout)
            except (TimeoutError, EnclaveError) as exc:
                logger.warning("worker %d: evidence failed (%s)", worker.slot, type(exc).__name__)
                return None
            return (worker, *split_evidence(frame))

        results = await asyncio.gather(*(one(w) for w in workers))
        return [r for r in results if r is not None]

    async def provision(self, key_id: str, sealed_key: bytes) -> int:
        """Hand the owner's sealed model key to one worker; share the sealed blob with all.

        Returns the number of workers that hold the model key afterwards.
        """
        async with self._provision_lock:
            worker = self._worker_for(key_id)
            frame = await worker.channel.call(MsgType.PROVISION, body=sealed_key, timeout=self._timeout)
            blob = bytes(frame.body)
            if blob:  # empty: the TEE has no sealing key (a CVM); nothing to store or share
                self._store_sealed_key(blob)
            worker.provisioned = True
            self.reprovision_needed = None
            for other in self.workers:
                if blob and other is not worker and not other.provisioned:
                    try:
                        await other.channel.call(MsgType.UNSEAL, body=blob, timeout=self._timeout)
                        other.provisioned = True
                    except (TimeoutError, EnclaveError) as exc:
                        logger.error("worker %d: unseal failed (%s)", other.slot, type(exc).__name__)
            self._update_ready()
            return sum(1 for w in self.workers if w.provisioned)

    async def _release_key(self, worker: Worker, attempts: int = 6) -> None:
        """Get the model key for an unprovisioned *worker* from the key server (attested key
        release, `host.keyrelease`), retrying with back-off; the worker stays unprovisioned
        (and /healthz says so) if the key server keeps refusing."""
        from infenclave.host.keyrelease import fetch_sealed_model_key

        started = time.perf_counter()
        for attempt in range(attempts):
            if worker.provisioned or worker.channel.closed or self._stopping:
                return
            try:
                if self.sealed_key_path.exists():  # another worker got it meanwhile
                    try:
                        await worker.channel.call(
                            MsgType.UNSEAL, body=self.sealed_key_path.read_bytes(), timeout=self._timeout
                        )
                        worker.provisioned = True
                        self._update_ready()
                        return
                    except EnclaveRefused as exc:  # another sealing key (a remote enclave): release
                        if exc.code != SEALED_STATE_UNOPENABLE:
                            raise
                sealed = await fetch_sealed_model_key(
                    self._keyserver or "",
                    worker.channel,
                    worker.public_key,
                    self.manifest.model_id,
                    timeout=self._timeout,
                )
                ready = await self.provision(worker.key_id, sealed)
                logger.info(
                    "worker %d: model key released by the key server in %.0f ms (%d worker(s) ready)",
                    worker.slot,
                    (time.perf_counter() - started) * 1e3,
                    ready,
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged, retried, never fatal to the pool
                logger.error("worker %d: key release failed (%s: %s)", worker.slot, type(exc).__name__, exc)
            await asyncio.sleep(min(0.5 * 2**attempt, 10.0))

    async def classify(self, key_id: str, request_id: str, sealed: bytes, batcher: Any) -> bytes:
        """Relay one sealed request through FrontNet (enclave), BackNet (here), Tail (enclave).

        For a whole-model bundle (*batcher* None) the enclave runs everything and answers the
        REQUEST with the RESULT: an IR1 from it is refused here too.
        Returns the sealed answer for the client. Raises `UnknownEnclaveKey`,
        `NotProvisioned`, `WorkerLost`, `EnclaveRefused` or `ServerError`.
        """
        worker = self._worker_for(key_id)
        if not worker.provisioned:
            raise NotProvisioned("the model key has not been provisioned to this enclave yet")
        channel = worker.channel
        tag = channel.new_tag()
        t0 = time.perf_counter()
        in_enclave = True  # False while the request is here (BackNet): it cannot kill the worker then
        try:
            first = await channel.call(
                MsgType.REQUEST, {"request_id": request_id}, sealed, tag=tag, timeout=self._timeout
            )
            in_enclave = False
            t1 = time.perf_counter()
            self._metrics.observe_stage("enclave_in", t1 - t0)
            self._record_enclave_stages(first)
            if first.type == MsgType.RESULT:  # refused image: the reason is sealed to the client
                return bytes(first.body)
            if first.type != MsgType.IR1 or batcher is None or self.manifest.backnet is None:
                raise ServerError("the enclave answered a request with an unexpected frame")
            ir1 = tensor_from_frame(first, self._ir1_shape)  # (1, C, H, W), read-only view
            outputs = await batcher.run(ir1)  # [IR2 (1, C', H', W'), *checked intermediates]
            t2 = time.perf_counter()
            self._metrics.observe_stage("backnet", t2 - t1)
            in_enclave = True
            try:
                if self.manifest.backnet.verified:  # IR2 and what the enclave checks it with
                    result = await channel.call(
                        MsgType.IR2,
                        tensors_meta(outputs),
                        b"".join(memoryview(y).cast("B") for y in outputs),
                        tag=tag,
                        timeout=self._timeout,
                    )
                else:
                    ir2 = outputs[0]
                    result = await channel.call(
                        MsgType.IR2, tensor_meta(ir2), memoryview(ir2).cast("B"), tag=tag, timeout=self._timeout
                    )
            except EnclaveRefused as exc:
                if exc.code == BACKNET_CHECK_FAILED:
                    self._metrics.backnet_check_failed()
                raise
            self._metrics.observe_stage("enclave_out", time.perf_counter() - t2)
            self._record_enclave_stages(result)
            if result.type != MsgType.RESULT:
                raise ServerError("the enclave answered IR2 with an unexpected frame")
            return bytes(result.body)
        except ChannelClosed as exc:
            cause = await self._crash_cause(worker) if in_enclave else None
            if cause is not None:
                raise WorkerCrashed(
                    f"enclave worker {worker.slot} {cause} while it held this request; the "
                    "request may be the cause, so it is not retried"
                ) from exc
            raise WorkerLost(
                f"enclave worker {worker.slot} stopped while handling this request; attest again and retry"
            ) from exc
        except TimeoutError as exc:
            raise ServerError("the enclave did not answer in time") from exc

    def _record_exit(self, worker: Worker) -> None:
        """Note how *worker* died (before its cgroup, which counts OOM kills, is removed)."""
        code = worker.process.returncode
        if worker.cgroup is not None and self._memory is not None:
            if self._memory.oom_kills(worker.cgroup):
                worker.crash_cause = "ran out of its memory limit"
            self._memory.release(worker.cgroup)
        if worker.crash_cause is None and not isinstance(worker.process, asyncio.subprocess.Process):
            # A remote enclave: how it ended is not visible from here, so a request it held
            # may be the cause.
            worker.crash_cause = "closed its connection (a remote enclave; how it ended is not known here)"
        if worker.crash_cause is None and code not in _EXTERNAL_SIGNALS and not self._stopping:
            worker.crash_cause = (
                f"crashed ({signal.Signals(-code).name})"
                if code is not None and code < 0 and -code in signal.valid_signals()
                else f"exited with status {code}"
            )
        worker.exited.set()

    async def _crash_cause(self, worker: Worker) -> str | None:
        """How the worker whose channel just closed died, when a request may be the cause."""
        try:
            await asyncio.wait_for(worker.exited.wait(), _EXIT_WAIT_S)
        except TimeoutError:
            return "closed its channel and did not exit"
        return worker.crash_cause

    def _record_enclave_stages(self, frame: Frame) -> None:
        stages = frame.meta.get("t")
        if isinstance(stages, dict):
            for name, ms in stages.items():
                if isinstance(ms, (int, float)) and name.endswith("_ms"):
                    self._metrics.observe_stage(name[:-3], float(ms) / 1e3)


def split_evidence(frame: Frame) -> tuple[str, bytes, bytes | None]:
    """An EVIDENCE_OK frame as (tee, raw evidence, certificates): a confidential VM's body
    ends with ``aux_bytes`` of auxiliary data, for SEV-SNP the certificate table, which the
    host turns into the PEM chain the verifier reads (untrusted: the verifier checks it)."""
    from infenclave.attest._snp import certificates_from_table

    tee, body = str(frame.meta.get("tee")), bytes(frame.body)
    aux_bytes = frame.meta.get("aux_bytes", 0)
    if not isinstance(aux_bytes, int) or not 0 <= aux_bytes <= len(body):
        raise EnclaveError("evidence: aux_bytes out of range")
    raw, aux = body[: len(body) - aux_bytes], body[len(body) - aux_bytes :]
    try:
        return tee, raw, certificates_from_table(aux) if tee == "sev-snp" and aux else None
    except VerificationError as exc:
        raise EnclaveError("evidence: the SEV-SNP certificate table is malformed") from exc


def _make_host_undumpable() -> None:
    """The host is the path to the network: a process of its user (a compromised worker
    started as a non-root host) must not ptrace it or write its ``/proc/<pid>/mem``. The
    enclave's sandbox refuses both already; this is the host's own wall. Fails closed."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0 or libc.prctl(3, 0, 0, 0, 0) != 0:  # PR_SET/GET_DUMPABLE
        raise ServerError("could not make the host process non-dumpable")


_enclave_log = logging.getLogger("infenclave.enclave")
#: An enclave log line is one short sentence; longer ones are cut (the host never needs more).
_MAX_LOG_LINE = 2000


async def _relay_log(stream: asyncio.StreamReader, slot: int, pid: int) -> None:
    """Log what a worker writes to stderr, line by line, through the host's logging."""
    prefix = f"enclave[{pid}]: "
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line over the stream limit: asyncio has dropped it
            continue
        if not line:
            return
        text = line.decode("utf-8", errors="replace").rstrip()
        _enclave_log.info("worker %d (pid %d): %s", slot, pid, text.removeprefix(prefix)[:_MAX_LOG_LINE])


def _enclave_env() -> dict[str, str]:
    """A minimal environment: nothing of the host's (LD_PRELOAD, PYTHON*) reaches the enclave."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    # Let an editable/dev install be found exactly as the host finds it.
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


async def _reap(process: asyncio.subprocess.Process) -> None:
    try:
        await asyncio.wait_for(process.wait(), 5.0)
    except TimeoutError:
        process.kill()
        await process.wait()
