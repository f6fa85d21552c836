"""The scan: every (cut point, image, channel) through the oracle, as fast as the oracle allows.

Order of work and why:
- all IRs come from ONE forward per image chunk of a copy of the model whose every cut
  tensor is an extra output (the model's own prediction p comes out of the same run);
- each feature map is min-max normalised, and maps equal after normalisation (above all the
  constant maps, which all project to the same black image, at any cut) go to the oracle
  once: the first is the *leader*, the others follow its answer;
- channel images are batched across channels, images and cut points, and the runtime setting
  (sessions x threads, batch) is chosen by timing the first batches (`runtime.Tuner`);
- early-stop mode (the default): a cut point is unsafe as soon as one channel's KL is at or
  below delta for one image, and its remaining channels are skipped; images are tried in
  order of how close they came to unsafe at the previous cut point, channels in a seeded
  random order, a couple of channels of every image before the rest of any; the scan ends at
  the recommended cut plus the next two cut points.
  Full mode computes every channel of every cut point for every image.
- Ctrl-C stops the loop after the batches already running; the result is marked partial.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from infenclave.assess.kl import (
    CONSTANT_KEY,
    Oracle,
    kl_divergence,
    kl_to_uniform,
    log_probs,
    map_key,
    minmax_normalise,
    project,
)
from infenclave.assess.runtime import RuntimeConfig, SessionPool, Tuner, candidate_configs, cpu_count
from infenclave.enclave.imaging import normalise
from infenclave.errors import AssessmentError
from infenclave.network import CutPoint, Network

Mode = Literal["early-stop", "full"]
CutStatus = Literal["safe", "unsafe", "incomplete", "not-scanned", "not-assessable"]
NEXT_CUTS_AFTER_RECOMMENDED = 2  # early-stop mode scans the recommended cut and two more
IR_CHUNK = 8  # images per IR forward: bounds the memory of one run, not the kept IRs
PROBE_CHANNELS = 2  # early stop: channels of every image tried before any image's rest
DEDUP_CACHE = 512  # recent oracle answers kept for duplicate maps (constant maps: always)


@dataclass(frozen=True)
class AssessImage:
    """One sample photo as the model sees it (decoded, resized, centre-cropped)."""

    name: str
    source: str  # "builtin:<name>" or the file path the user gave
    sha256: str  # of the encoded file, so a plan names its images without containing them
    pixels: np.ndarray  # (H, W, 3) uint8


@dataclass
class ImageCutResult:
    """KL of every channel of one cut point for one image (NaN where not computed)."""

    kl: np.ndarray  # (C,) float64
    delta: float
    deduplicated: int = 0  # channels answered from an identical map's oracle result

    @property
    def evaluated(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.kl)))

    @property
    def complete(self) -> bool:
        return self.evaluated == self.kl.size

    @property
    def min_kl(self) -> float | None:
        """Minimum over the channels computed (an upper bound when not complete)."""
        return float(np.nanmin(self.kl)) if self.evaluated else None

    @property
    def median_kl(self) -> float | None:
        return float(np.nanmedian(self.kl)) if self.evaluated else None

    @property
    def min_channel(self) -> int | None:
        return int(np.nanargmin(self.kl)) if self.evaluated else None

    @property
    def unsafe(self) -> bool:
        """Decided unsafe: some computed channel is at or below delta."""
        return bool(self.evaluated and np.nanmin(self.kl) <= self.delta)

    @property
    def safe(self) -> bool | None:
        """True/False when decided, None while channels are missing and none is below delta."""
        if self.unsafe:
            return False
        return True if self.complete else None


@dataclass
class CutResult:
    cut: CutPoint
    images: list[ImageCutResult] | None  # None: not a (C, H, W) feature map
    status: CutStatus = "not-scanned"
    stopped_early: bool = False  # unsafe, and the remaining channels were skipped


@dataclass
class ScanStats:
    channel_images: int = 0  # channel images whose KL is known (forwarded + deduplicated)
    forwarded: int = 0  # oracle forwards actually run
    deduplicated: int = 0
    skipped: int = 0  # channel images not computed (early stop, scan end, interrupt)
    ir_seconds: float = 0.0
    oracle_seconds: float = 0.0  # wall time of the batched oracle loop
    oracle_cpu_seconds: float = 0.0  # CPU time of this process (all threads) in that loop
    runtime: dict[str, object] = field(default_factory=dict)

    @property
    def oracle_images_per_s(self) -> float:
        return self.forwarded / self.oracle_seconds if self.oracle_seconds else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "channel_images": self.channel_images,
            "oracle_forwards": self.forwarded,
            "deduplicated": self.deduplicated,
            "skipped": self.skipped,
            "ir_seconds": round(self.ir_seconds, 3),
            "oracle_seconds": round(self.oracle_seconds, 3),
            "oracle_cpu_seconds": round(self.oracle_cpu_seconds, 3),
            "oracle_images_per_s": round(self.oracle_images_per_s, 1),
            "runtime": self.runtime,
        }


@dataclass
class ScanResult:
    images: list[AssessImage]
    log_p: np.ndarray  # (N, K) the model's own log-probabilities
    delta: np.ndarray  # (N,) KL(p || uniform)
    cuts: list[CutResult]
    irs: dict[str, np.ndarray]  # cut name -> (N, C, h, w) float32, assessable cuts only
    mode: Mode
    seed: int
    partial: bool = False  # stopped (Ctrl-C) before the planned work was done
    stats: ScanStats = field(default_factory=ScanStats)

    @property
    def recommended(self) -> CutResult | None:
        """First cut point safe for every image, provided every assessable cut before it is
        decided unsafe (in a partial scan an undecided earlier cut leaves no recommendation)."""
        for cr in self.cuts:
            if cr.images is None:
                continue
            if cr.status == "safe":
                return cr
            if cr.status != "unsafe":
                return None
        return None


ProgressFn = Callable[[int, int, str], None]  # (done units, total units, what is being done)


@dataclass
class _Item:
    cut: int  # position in ScanResult.cuts
    image: int
    channel: int
    unit_map: np.ndarray  # (h, w) float32 in [0, 1]
    key: bytes


def _decided_unsafe(cr: CutResult) -> bool:
    """Read the status afresh (results arrive while the stream is suspended)."""
    return cr.status == "unsafe"


class _Blocked:
    """Sentinel from the work stream: nothing can be issued until running batches report."""


_BLOCKED = _Blocked()


def scan(
    net: Network,
    oracle: Oracle,
    images: list[AssessImage],
    *,
    mode: Mode = "early-stop",
    seed: int = 0,
    runtime: RuntimeConfig | None = None,
    only: list[str] | None = None,
    progress: ProgressFn | None = None,
) -> ScanResult:
    """Run the KL-oracle method over `net`'s cut points for `images` (see module docstring).

    `only` restricts the scan to the named cut points (the others stay `not-scanned`);
    `runtime` pins the oracle's runtime setting instead of choosing it by measurement.
    """
    if only is not None:
        for name in only:
            if not net.cut(name).is_feature_map:  # net.cut refuses unknown names
                raise AssessmentError(f"cut point {name!r} is not a feature map: not assessable")
    if not images:
        raise AssessmentError("no images to assess")
    if not any(c.is_feature_map for c in net.cuts):
        raise AssessmentError(
            f"{net.model.name}: no cut point has a (C, H, W) feature map; the KL-oracle method cannot assess this model"
        )
    result = _forward_irs(net, images, mode, seed)
    if oracle.own_reference:
        _rebase_on_oracle(result, oracle)
    _Scanner(result, oracle, runtime, progress, set(only) if only is not None else None).run()
    return result


def _rebase_on_oracle(result: ScanResult, oracle: Oracle) -> None:
    """p and delta from the oracle's own prediction on each photo (an oracle with other classes)."""
    from infenclave.enclave.onnx_runner import OnnxPart

    part = OnnxPart(oracle.onnx_bytes, threads=cpu_count())
    x = normalise(np.stack([im.pixels for im in result.images]), oracle.preprocess)
    result.log_p = log_probs(
        np.concatenate([part(x[i : i + IR_CHUNK]) for i in range(0, len(x), IR_CHUNK)]), oracle.output
    )  # (N, K_oracle)
    result.delta = kl_to_uniform(result.log_p)
    for cr in result.cuts:
        for res, d in zip(cr.images or [], result.delta):
            res.delta = float(d)


def _forward_irs(net: Network, images: list[AssessImage], mode: Mode, seed: int) -> ScanResult:
    """One forward per chunk of images with every cut tensor as an extra output."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    assessable = [c for c in net.cuts if c.is_feature_map]
    proto = onnx.ModelProto()
    proto.CopyFrom(net.onnx_model)
    del proto.graph.output[1:]
    for c in assessable:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(c.tensor, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cpu_count()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [net.output_name, *(c.tensor for c in assessable)]
    pre = net.model.preprocess
    chunks: list[list[np.ndarray]] = []
    for i in range(0, len(images), IR_CHUNK):
        x = normalise(np.stack([im.pixels for im in images[i : i + IR_CHUNK]]), pre)  # (n, 3, H, W)
        chunks.append(sess.run(names, {net.input_name: x}))
    outs = [np.concatenate([ch[j] for ch in chunks]) for j in range(len(names))]
    log_p = log_probs(outs[0], net.model.output)  # (N, K)
    delta = kl_to_uniform(log_p)  # (N,)
    irs = {c.name: np.asarray(o, np.float32) for c, o in zip(assessable, outs[1:])}  # (N, C, h, w)
    cuts = []
    for c in net.cuts:
        if c.is_feature_map:
            per_image = [ImageCutResult(kl=np.full(c.shape[0], np.nan), delta=float(d)) for d in delta]
            cuts.append(CutResult(cut=c, images=per_image))
        else:
            cuts.append(CutResult(cut=c, images=None, status="not-assessable"))
    result = ScanResult(images=images, log_p=log_p, delta=delta, cuts=cuts, irs=irs, mode=mode, seed=seed)
    result.stats.ir_seconds = time.perf_counter() - t0
    return result


class _NoLimit:
    def restore_original_limits(self) -> None:
        pass


def _single_thread_blas() -> Any:
    """Limit numpy's BLAS to one thread for the scan (`.restore_original_limits()` undoes it).

    Measured: with OpenBLAS's default of one thread per core, the resize GEMMs of the
    projection spin against the ONNX Runtime threads and ran 50x slower than single-threaded.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed matter
        return _NoLimit()
    return threadpool_limits(limits=1, user_api="blas")


class _Scanner:
    """The batched oracle loop over a prepared `ScanResult` (fills its KL arrays in place)."""

    def __init__(
        self,
        result: ScanResult,
        oracle: Oracle,
        runtime: RuntimeConfig | None,
        progress: ProgressFn | None,
        only: set[str] | None,
    ) -> None:
        self.r = result
        self.only = only
        self.oracle = oracle
        self.early = result.mode == "early-stop"
        self.progress = progress
        self.fixed = runtime is not None
        self.tuner = Tuner([runtime] if runtime else candidate_configs(), fixed=self.fixed)
        self.buffer: list[_Item] = []
        self.exhausted = False
        self.cache: OrderedDict[bytes, np.ndarray] = OrderedDict()  # key -> (K,) log q
        self.followers: dict[bytes, list[_Item]] = {}  # key of an in-flight leader -> duplicates
        self.total_units = sum(len(result.images) * c.cut.shape[0] for c in result.cuts if self._in_scope(c))
        self.stopped_at: int | None = None  # early stop: positions after this are not scanned

    # --- the main loop ---------------------------------------------------------------------
    def run(self) -> None:
        stats = self.r.stats
        workers = max(c.workers for c in ([self.tuner.config] if self.fixed else candidate_configs()))
        pool = SessionPool(self.oracle.onnx_bytes, workers)
        stream = self._stream()
        in_flight: dict[Future[np.ndarray], tuple[RuntimeConfig, list[_Item]]] = {}
        idle = 0
        t0, c0 = time.perf_counter(), time.process_time()
        blas = _single_thread_blas()  # the projection shares the cores with the oracle sessions
        try:
            while True:
                while self.tuner.may_submit([cfg for cfg, _ in in_flight.values()]):
                    cfg = self.tuner.config
                    batch = self._next_batch(stream, cfg.batch)
                    if not batch:
                        break
                    in_flight[pool.submit(cfg, self._project(batch))] = (cfg, batch)  # (B, 3, H, W)
                if not in_flight:
                    if self.exhausted:
                        break
                    idle += 1  # the stream waits for decisions, yet nothing is running
                    if idle > 2:
                        raise AssessmentError("internal error: the scan stalled")
                    continue
                idle = 0
                done, _ = wait(list(in_flight), timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    cfg, batch = in_flight.pop(fut)
                    self._record(batch, fut.result())
                    self.tuner.done(cfg, len(batch))
                    stats.forwarded += len(batch)
                self._report()
        except KeyboardInterrupt:
            self.r.partial = True  # what is recorded stays; running batches are dropped
        finally:
            blas.restore_original_limits()
            pool.close()
            stats.oracle_seconds = time.perf_counter() - t0
            stats.oracle_cpu_seconds = time.process_time() - c0
            stats.runtime = self.tuner.summary()
        self._finish()

    def _next_batch(self, stream: Iterator[_Item | _Blocked], size: int) -> list[_Item]:
        """Up to `size` items; fewer when the stream ends or waits for decisions (a partial
        batch must go out then: the decision it waits for may depend on those items)."""
        while len(self.buffer) < size and not self.exhausted:
            item = next(stream, None)
            if item is None:
                self.exhausted = True
            elif isinstance(item, _Blocked):
                break
            else:
                self.buffer.append(item)
        batch, self.buffer = self.buffer[:size], self.buffer[size:]
        return batch

    def _in_scope(self, cr: CutResult) -> bool:
        return cr.images is not None and (self.only is None or cr.cut.name in self.only)

    def _project(self, batch: list[_Item]) -> np.ndarray:
        """Project a batch whose maps may come from cut points of different sizes."""
        pre = self.oracle.preprocess
        if len({it.unit_map.shape for it in batch}) == 1:
            return project(np.stack([it.unit_map for it in batch]), pre)
        return np.concatenate([project(it.unit_map[None], pre) for it in batch])

    # --- the work stream ---------------------------------------------------------------------
    def _stream(self) -> Iterator[_Item | _Blocked]:
        r = self.r
        for pos, cr in enumerate(r.cuts):
            if not self._in_scope(cr):
                continue
            if self.early:
                while not self._may_start(pos):
                    if self.stopped_at is not None:
                        return
                    yield _BLOCKED
                if self.stopped_at is not None:
                    return
            cr.status = "incomplete"  # until decided
            ir = r.irs[cr.cut.name]  # (N, C, h, w)
            images = self._image_order(pos)
            units = {i: minmax_normalise(ir[i]) for i in images}  # (C, h, w) each
            orders = {i: self._channel_order(cr, i) for i in images}
            # Early stop probes PROBE_CHANNELS of every image first: an unsafe image usually
            # has many revealing maps, so this finds it within one batch whatever the order.
            probe = PROBE_CHANNELS if self.early else 0
            phases = [[(i, orders[i][:probe]) for i in images], [(i, orders[i][probe:]) for i in images]]
            for phase in phases:
                for img, channels in phase:
                    for ch in channels:
                        if self.early and _decided_unsafe(cr):
                            cr.stopped_early = True
                            break
                        yield from self._issue(_Item(pos, img, ch, units[img][ch], map_key(units[img][ch])))

    def _channel_order(self, cr: CutResult, img: int) -> list[int]:
        """Seeded random order per (cut, image) in early-stop mode, whatever the issue order."""
        c = cr.cut.shape[0]
        if not self.early:
            return list(range(c))
        rng = np.random.default_rng([self.r.seed, cr.cut.index, img])
        return [int(ch) for ch in rng.permutation(c)]

    def _issue(self, item: _Item) -> Iterator[_Item]:
        """Answer a duplicate map from the cache or its in-flight twin; yield the rest."""
        if item.key in self.cache:
            self.cache.move_to_end(item.key)
            self._set_kl(item, self.cache[item.key], dedup=True)
        elif item.key in self.followers:
            self.followers[item.key].append(item)
        else:
            self.followers[item.key] = []
            yield item

    def _may_start(self, pos: int) -> bool:
        """Early stop: cut `pos` is needed only if no cut 3+ places before it may be the
        recommendation; that is known once all of those are decided, none of them safe."""
        cuts = self.r.cuts
        index = cuts[pos].cut.index
        for cr in cuts[:pos]:
            if not self._in_scope(cr) or cr.cut.index >= index - NEXT_CUTS_AFTER_RECOMMENDED:
                continue
            if cr.status == "safe":
                self.stopped_at = cr.cut.index + NEXT_CUTS_AFTER_RECOMMENDED
                return False
            if cr.status != "unsafe":
                return False
        return True

    def _image_order(self, pos: int) -> list[int]:
        """Images likeliest to be unsafe at cut `pos` first (early stop: one unsafe image ends
        the cut, so it should come before the safe ones, whose every channel is needed).

        Likelihood: min KL / delta at the latest earlier cut where the image has any KL
        (early stop leaves many images without any); an image never computed yet ranks as
        borderline (1.0): after the known-unsafe ones, before the known-safe ones.
        """
        n = len(self.r.images)
        if not self.early:
            return list(range(n))

        def margin(i: int) -> float:
            for cr in reversed(self.r.cuts[:pos]):
                res = cr.images[i] if cr.images is not None else None
                if res is not None and res.min_kl is not None:
                    return res.min_kl / max(res.delta, 1e-12)
            return 1.0

        return sorted(range(n), key=margin)

    # --- results -------------------------------------------------------------------------------
    def _record(self, batch: list[_Item], scores: np.ndarray) -> None:
        log_q = log_probs(scores, self.oracle.output)  # (B, K)
        for item, lq in zip(batch, log_q):
            self._set_kl(item, lq, dedup=False)
            for f in self.followers.pop(item.key, []):
                self._set_kl(f, lq, dedup=True)
            self.cache[item.key] = lq
            self.cache.move_to_end(item.key)
        while len(self.cache) > DEDUP_CACHE:
            oldest = next(iter(self.cache))
            if oldest == CONSTANT_KEY:
                self.cache.move_to_end(oldest)  # shared by every cut point: keep it
                oldest = next(iter(self.cache))
            del self.cache[oldest]

    def _set_kl(self, item: _Item, log_q: np.ndarray, *, dedup: bool) -> None:
        cr = self.r.cuts[item.cut]
        res = cr.images[item.image]  # type: ignore[index]
        if not np.isnan(res.kl[item.channel]):
            return
        res.kl[item.channel] = float(kl_divergence(self.r.log_p[item.image], log_q))
        self.r.stats.channel_images += 1
        if dedup:
            res.deduplicated += 1
            self.r.stats.deduplicated += 1
        if res.unsafe:
            cr.status = "unsafe"
        elif cr.status != "unsafe" and all(i.complete for i in cr.images):  # type: ignore[union-attr]
            cr.status = "safe"

    def _report(self) -> None:
        if self.progress is None:
            return
        done = 0
        current = ""
        for cr in self.r.cuts:
            if not self._in_scope(cr) or not cr.images:
                continue
            full = len(cr.images) * cr.cut.shape[0]
            if cr.status in ("safe", "unsafe") and (self.early or cr.status == "safe"):
                done += full
            elif self.stopped_at is not None and cr.cut.index > self.stopped_at:
                done += full
            else:
                done += sum(i.evaluated for i in cr.images)
                if cr.status == "incomplete" and not current:
                    current = cr.cut.name
        self.progress(done, self.total_units, current)

    def _finish(self) -> None:
        """Count what was not computed; a cut started but undecided stays `incomplete` (only
        an interrupted scan leaves one: early stop decides every cut it starts)."""
        for cr in self.r.cuts:
            if cr.images is not None:
                self.r.stats.skipped += sum(i.kl.size - i.evaluated for i in cr.images)
        if self.progress is not None:
            done = sum(i.evaluated for cr in self.r.cuts if cr.images for i in cr.images)
            self.progress(done if self.r.partial else self.total_units, self.total_units, "")
