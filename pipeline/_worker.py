"""The work of one worker: build the model once, then turn shards into committed Parquet files.

:class:`ShardWorker` is plain Python: an executor runs it as a Ray actor, or in threads of the
driver's process (``run.executor: local``); tests also call it directly. For each shard it
overlaps three stages: a loader thread reads and decodes the next batch while the model runs on
this one, and writer threads (one per layer) encode and write the previous batch. The driver
lets an actor run two shards at once, in two threads (four with eight CPUs or more): one forward at a time holds the device, so the next shard's first load and the last
shard's final writes overlap a forward too. Only the shard's record (files, rows, bytes,
timings, bad samples) goes back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from extender import OutputSelectionError
from extender._selectors import element_ids

from ._decoder import Decoder
from ._device import breaks_the_device
from ._labels import split_unfit
from ._layout import SOURCE_INDEX_PATH, shard_record_path
from ._metrics import ActorMetrics, peak_rss_mb
from ._model_inputs import resolve_input
from ._models import LayerOutputs, build_model, describe_failure, is_config_fault, model_identity
from ._preprocess import stack_images, to_model_input
from ._records import LayerSpec, ShardRecord
from ._reduce import (CHANNELS_FIRST, CHANNELS_LAST, channels_at_end, check_class_token, declares_channels_last,
                      fits_no_grid, layout_by_growth, layout_from_growth, reduce_output, windows_from_growth)
from ._scheduling import SHARE_GPU_CPUS
from ._shards import Shard
from ._sources import BadSample, IndexFile, Sample, describe_error, open_source
from ._stats import ValueStats
from ._store import OutputStore
from ._writer import LayerFileWriter, build_table
from .config import Config, DumpSpec, ModelSpec, Precision, PreprocessSpec, Reduction, RunSpec, Shapes
from .errors import (BadSampleError, ConfigError, DeviceMemoryError, LayerOutputError, PipelineError,
                     ShapeChangedError, WeightsMismatchError)

log = logging.getLogger(__name__)

#: The exit status of an actor's process ended by :meth:`ShardWorker._end_if_broken`, and the
#: seconds a progress question waits before it ends it (the failed shard's error goes first).
EXIT_DEVICE_BROKEN, BROKEN_GRACE = 75, 1.0

_AUTOCAST = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_LOCK = threading.Lock()


def _device_lock(device: torch.device) -> threading.Lock:
    """The lock of a GPU in this process: one forward at a time on it, whichever worker runs it. On the CPU each worker has its own: their forwards may run side by side."""
    if device.type == "cpu":
        return threading.Lock()
    with _DEVICE_LOCKS_LOCK:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


class _Stopped(RuntimeError):
    """The worker was stopped while the shard ran (its files are dropped)."""


@dataclasses.dataclass
class _Batch:
    """A loaded batch: the good samples, their preprocessed images, and the bad ones."""

    samples: list[Sample]
    images: list[torch.Tensor]
    bad: list[BadSample]


@dataclasses.dataclass
class _Outputs:
    """One batch's layer outputs on (or on their way to) the host.

    One entry per group of equal-shaped inputs: the group's positions in the batch and each
    layer's ``(rows, ...)`` tensor. Usually a batch is one group, in sample order.
    """

    groups: list[tuple[list[int], dict[str, torch.Tensor]]]
    ready: torch.cuda.Event | None = None

    def rows(self, layer: str, count: int) -> list[np.ndarray]:
        """The layer's outputs, one array per sample, in sample order."""
        rows: list[Any] = [None] * count
        for positions, tensors in self.groups:
            array = _as_numpy(tensors[layer])
            for row, position in enumerate(positions):
                rows[position] = array[row]
        return rows


@dataclasses.dataclass
class _Columns:
    """The columns a batch shares across layers: ids, indices, pass-through labels."""

    ids: list[str]
    indices: list[int]
    labels: dict[str, list[Any]]

    @classmethod
    def of(cls, samples: Sequence[Sample], fields: Sequence[pa.Field] = ()) -> _Columns:
        """The columns of ``samples``: every scalar label column in ``fields`` (a sample without
        the label has a null), then the array labels the samples have."""
        names = dict.fromkeys(f.name for f in fields)
        for sample in samples:
            names.update(dict.fromkeys(sample.labels))
        return cls([s.sample_id for s in samples], [s.index for s in samples],
                   {n: [s.labels.get(n) for s in samples] for n in names})


class _DiscardingWriter:
    """A writer that builds the tables of a probe and keeps nothing."""

    def write(self, table) -> None:
        pass


def settle_heap() -> int:
    """In a process that lives for one worker (an actor of the Ray executor): one full
    collection, then every object made so far (the modules of torch, Ray and pyarrow, the model,
    the source) is kept out of the collector's sight for good, since they live as long as the
    process. The collections during the dump then walk the objects it makes, not the whole
    heap. In the bench's Parquet dump (2 actors on 2 cores), each actor made a full collection
    every 10 s or so, of 0.16-0.19 s (2% of its time; 3-4% of a 5 s dump); the one here takes
    0.13 s, once.

    The youngest generation is collected after 10,000 new objects, not 700: the batches in
    flight hold a few thousand (samples, their labels, tensors), which reference counting frees,
    so at 700 the collector ran every 300 rows or so to find next to nothing (170 times per
    actor in that 5 s span, 30-40 ms); at 10,000 it did not run there at all.

    Returns how many objects are now out of sight, counted here once: ``gc.get_freeze_count``
    walks them all (11 ms for an actor's 225,000; asked once per shard, it took a tenth of an
    actor's CPU in the bench's Parquet dump)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    return gc.get_freeze_count()


def _host(t: torch.Tensor) -> torch.Tensor:
    """Start the copy of a device tensor to host memory (pinned, so the copy is asynchronous)."""
    return t if t.device.type == "cpu" else t.to("cpu", non_blocking=True)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raised_in(exc: BaseException, function: Any) -> bool:
    """Whether ``exc`` was raised inside a call of ``function`` (its traceback passes through it)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is function.__code__:
            return True
        tb = tb.tb_next
    return False


def _not_batch_first(layer: str, output: torch.Tensor, inputs: int) -> str:
    """Why a layer output whose first dim is not the batch's cannot be stored by sample.

    >>> _not_batch_first("rnn[1]", torch.zeros(1, 2, 8), 2)
    "layer 'rnn[1]' gives a 1x2x8 tensor for 2 inputs: its first dim is not the batch's, so its rows are not the samples' (a sequence-first RNN's state, one image's detections); dump a layer, or pick an output, with one row per input"
    """
    shape = "x".join(map(str, output.shape)) or "0-d"
    return (f"layer {layer!r} gives a {shape} tensor for {inputs} input{'s' if inputs != 1 else ''}: its first dim "
            "is not the batch's, so its rows are not the samples' (a sequence-first RNN's state, one image's "
            "detections); dump a layer, or pick an output, with one row per input")


def _windows_refused(layer: str, shape: Sequence[int], reduce: Reduction) -> str:
    """Why ``reduce`` cannot take a layer whose maps are windows of tokens.

    >>> print(_windows_refused("attn", (16, 4, 32), Reduction.POOL))
    'pool' takes (channels, height, width) or (height, width, channels) maps, but layer 'attn' gives windows of tokens, (16, 4, 32) per sample: the same dim grows with the input's height and with its width (as inside MaxViT's partitions), so there is no image grid to pool; dump a layer after the windows are put back together (MaxViT's PartitionAttentionLayer), or 'none'
    """
    shape = "(" + ", ".join(map(str, shape)) + ")"
    return (f"{reduce.value!r} takes (channels, height, width) or (height, width, channels) maps, but layer {layer!r} "
            f"gives windows of tokens, {shape} per sample: the same dim grows with the input's height and with its "
            "width (as inside MaxViT's partitions), so there is no image grid to pool; dump a layer after the windows "
            "are put back together (MaxViT's PartitionAttentionLayer), or 'none'")


def _not_a_tensor(layer: str, output: Any) -> str:
    """Why a layer's ``output`` cannot be stored, and what to dump instead: one of its tensors
    through a selector, where it holds any (a tuple, a dict, a dataclass, ...), else another layer.

    >>> _not_a_tensor("pair", (None, {"k": torch.zeros(1)}))
    "layer 'pair' gave tuple instead of a tensor; pick one of its tensors with a selector, e.g. 'pair[1][k]' (`actmap layers MODEL --input-size ...` lists them)"
    >>> _not_a_tensor("count", 7)
    "layer 'count' gave int instead of a tensor, and no selector can pick a tensor out of it; dump another layer (`actmap layers MODEL --input-size ...` lists each layer's output)"
    """
    what = "None" if output is None else type(output).__name__
    selector = next((keys for keys, _ in element_ids(output)), None)
    if selector is not None:
        return (f"layer {layer!r} gave {what} instead of a tensor; pick one of its tensors with a selector, e.g. "
                f"'{layer}{selector}' (`actmap layers MODEL --input-size ...` lists them)")
    return (f"layer {layer!r} gave {what} instead of a tensor, and no selector can pick a tensor out of it; dump "
            "another layer (`actmap layers MODEL --input-size ...` lists each layer's output)")


class ShardWorker:
    """Dumps shards of the run ``config`` (a config dict, as the driver ships it).

    Args:
        config: ``Config.to_dict()`` of the run.
        expected_digest: the weights digest the driver computed; a worker whose model differs
            (a builder that is not deterministic under the seed) refuses to start.
        device: where the model runs; by default the GPU when this process sees one.
        layer_shapes: each layer's stored per-sample shape as the driver's trial sample gave it;
            with fixed shapes every batch must match it.
        decode_threads: threads that decode and resize images (default: ``run.cpus_per_actor``).
        frozen_source: number the samples by the source index the driver wrote into the output
            (``_actmap/source-index.parquet``), instead of looking at the source anew.
        shards_at_once: how many shards the driver runs here at once (each writes its own files).
        own_process: whether the worker has its process to itself (an actor the Ray executor
            started): its heap is then settled once built (:func:`settle_heap`). A worker built
            in a process of someone else's (the local executor, a user's own actor) leaves that
            process's collector as it is.
    """

    def __init__(self, config: Mapping[str, Any], expected_digest: str | None = None,
                 device: str | None = None, layer_shapes: Mapping[str, Sequence[int]] | None = None,
                 decode_threads: int | None = None, frozen_source: bool = False, shards_at_once: int = 2,
                 own_process: bool = False, label_types: Mapping[str, Any] | None = None,
                 layer_layouts: Mapping[str, str] | None = None):
        self.config = Config.from_dict(config)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_model(self.config.model)
        self.identity = model_identity(self.config.model, model)
        self.digest = self.identity["weights_sha256"]
        if expected_digest is not None and self.digest != expected_digest:
            raise WeightsMismatchError(f"the model built on this worker has weights {self.digest[:12]}, the "
                                       f"driver's has {expected_digest[:12]}: {self.config.model.name!r} does "
                                       f"not build the same weights from {ModelSpec.key('seed')}; give a "
                                       f"{ModelSpec.key('weights')} file")
        check_class_token(model, self.config.dump)
        if self.config.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # what the model is fed (normalize: model reads the model's own config)
        self.inputs = resolve_input(self.config.source.preprocess, model)
        self.outputs = LayerOutputs(model.to(self.device), self.config.model)  # (an unknown layer: ConfigError)
        self.channels_at_end = channels_at_end(model, self.config.model.layers)
        self.declares_channels_last = declares_channels_last(model)
        # each 4-d layer's layout: the driver's trial's, else found on this worker's first batch
        self._layouts: dict[str, str] | None = None if layer_layouts is None else dict(layer_layouts)
        self.store = OutputStore(self.config.run.output)
        try:
            index = IndexFile(self.store.fs, self.store.path(SOURCE_INDEX_PATH)) if frozen_source else None
            self.source = open_source(self.config.source, index=index)
            if label_types is not None:  # the driver's: every worker writes the same columns
                self.source.use_label_types(label_types)
            self.label_fields = self.source.label_fields()
            arrays = getattr(self.source, "array_labels", dict)()
        except BaseException:
            self.outputs.remove()  # a source that does not open leaves no hooks behind
            raise
        self.fixed = self.config.shapes_fixed() or (self.config.dump.shapes is Shapes.AUTO and bool(self.inputs.crop))
        # array labels keep the first items' dtype, and their shape in a dump of fixed shapes
        self.label_arrays = {name: spec if self.fixed else dataclasses.replace(spec, shape=None)
                             for name, spec in arrays.items()}
        # the shape each layer must keep in a fixed-width column (first seen, unless given)
        self._shapes: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in (layer_shapes or {}).items()}
        self.mean_std = self.inputs.mean_std
        prep = self.config.source.preprocess
        # decoding threads: the actor's CPUs (the driver's trial sample: one)
        cpus = self.config.run.cpus_per_actor
        threads = decode_threads if decode_threads is not None else max(1, int(1 if cpus == "auto" else cpus))
        self.decoder = Decoder(threads, self.device, resize=self.inputs.resize, crop=self.inputs.crop,
                               max_pixels=prep.max_pixels, channels=prep.channels)
        # a loader per shard at work: each reads its own shard, the decoding pool is shared
        self._loader = ThreadPoolExecutor(max(1, shards_at_once), thread_name_prefix="actmap-load")
        # one writer per layer and shard at work: the files are independent, and pyarrow encodes
        # and writes without the GIL
        self._writer = ThreadPoolExecutor(len(self.config.model.layers) * max(1, shards_at_once),
                                          thread_name_prefix="actmap-write")
        # shards may run in several threads at once: the forwards take turns on the device (one
        # lock per device in this process, which the workers of a local executor share too)
        self._device = _device_lock(self.device)
        self.metrics = ActorMetrics(self.config.run.output)  # Ray metrics; the driver's per-batch progress
        self._stopping = threading.Event()
        self._forwards_done = 0  # batches whose forward worked: the model can run here
        self._own_process = own_process
        self._broken: float | None = None  # when the device broke (:meth:`_mark_broken`)
        self._frozen_objects = settle_heap() if own_process else 0
        log.info("worker ready on %s (%s), model %s", socket.gethostname(), self.device, self.digest[:12])

    def info(self) -> dict:
        """Where this worker runs: host, Ray node (when in Ray), process, device, threads, the
        objects it put out of its process's collector's sight (:func:`settle_heap`), and the
        process's peak memory so far. (The driver asks an idle actor before it hands it a shard.)"""
        self._end_if_broken()
        node = None
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            node = sys.modules["ray"].get_runtime_context().get_node_id()
        return {"host": socket.gethostname(), "node": node, "pid": os.getpid(), "device": str(self.device),
                "threads": torch.get_num_threads(), "decode_threads": self.decoder.threads,
                "frozen_objects": self._frozen_objects,
                # the process's peak resident memory so far (Linux reports KiB)
                "max_rss_mb": peak_rss_mb()}

    # -- stages ----------------------------------------------------------------------------

    def _load(self, read: Sequence[Sample | BadSample]) -> _Batch:
        # a label value that does not fit its column makes its sample bad, not the batch
        good, bad = split_unfit([s for s in read if isinstance(s, Sample)], self.label_fields, self.label_arrays)
        bad = [s for s in read if isinstance(s, BadSample)] + bad
        samples, images = [], []
        for sample, decoded in zip(good, self.decoder([s.image for s in good])):
            if isinstance(decoded, Exception):  # a sample that does not decode is recorded, not fatal
                bad.append(BadSample(sample.index, sample.sample_id, describe_error(decoded)))
            else:
                images.append(decoded)
                samples.append(sample)
        if bad and self.config.run.strict:
            first = bad[0]
            raise BadSampleError(f"sample {first.sample_id!r} (index {first.index}): {first.reason} "
                                 f"({RunSpec.key('strict')} is set; unset it to record bad samples and go on)")
        return _Batch(samples, images, bad)

    def _forward(self, batch: _Batch, stats: Mapping[str, ValueStats] | None = None) -> _Outputs:
        # equal-shaped images run together, so no sample is padded; rows keep sample order
        groups: dict[tuple, list[int]] = {}
        for position, image in enumerate(batch.images):
            groups.setdefault((tuple(image.shape), image.dtype, image.device), []).append(position)
        layers = self.config.model.layers
        results, counted = [], []
        for positions in groups.values():
            pixels = stack_images([batch.images[p] for p in positions])
            if self.device.type == "cuda" and pixels.device.type == "cpu":
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            x = to_model_input(pixels, self.mean_std, self.config.model.channels_last)
            finding = self._layouts is None
            with torch.inference_mode(), self._autocast(), \
                    self.outputs.shapes_seen() if finding else contextlib.nullcontext({}) as first_calls:
                outputs = self.outputs(x)
            if finding:
                self._layouts = self._find_layouts(x, outputs, first_calls)
            host = {}
            for layer in layers:
                out = outputs[layer]  # every wanted layer's: one that did not run has raised
                if not isinstance(out, torch.Tensor):
                    raise LayerOutputError(_not_a_tensor(layer, out))
                if out.ndim == 0 or out.shape[0] != len(positions):
                    raise LayerOutputError(_not_batch_first(layer, out, len(positions)))
                channels_last = out.ndim == 4 and self._layouts.get(layer) == CHANNELS_LAST
                stored = reduce_output(out, self.config.dump, layer, channels_last)
                counted.append((layer, stored))
                host[layer] = _host(stored)
            results.append((positions, host))
        if stats is not None:  # the stored values, counted on the device once the whole batch ran
            for layer, stored in counted:
                stats[layer].add(stored)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event(blocking=True)  # the writers wait asleep: a spinning wait takes a core
            ready.record(torch.cuda.current_stream(self.device))
        return _Outputs(results, ready)

    def _mark_broken(self, shard: Shard, exc: BaseException) -> None:
        """This worker's device is unusable (:func:`breaks_the_device`): its process, which it
        has to itself, ends at the driver's next call (:meth:`_end_if_broken`), once the
        driver has had the shard's error. Ray then starts the actor anew, with a new CUDA
        context; kept alive, the actor would fail every shard it is given."""
        self._broken = time.monotonic()
        log.error("shard %d failed on %s with %s: this process can no longer use the device, so it ends, and Ray "
                  "starts the actor anew", shard.id, self.device, describe_error(exc))

    def _end_if_broken(self, grace: float = 0.0) -> None:
        """End the process if its device broke at least ``grace`` seconds ago."""
        if self._broken is not None and time.monotonic() - self._broken >= grace:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(EXIT_DEVICE_BROKEN)

    def _forward_isolating(self, batch: _Batch, stats: Mapping[str, ValueStats]) -> tuple[_Batch, _Outputs | None]:
        """The batch's forward; when it fails, each sample's alone, so that one sample the model
        cannot take is recorded as bad instead of failing the shard. If every sample fails
        alone, the fault is not theirs: the batch's error is raised (so too for a batch of one
        sample before any forward of this worker has worked: the model may be at fault)."""
        try:
            outputs = self._forward(batch, stats)
            self._forwards_done += 1
            return batch, outputs
        except torch.OutOfMemoryError as exc:  # the batch is too large here: no sample is at fault
            raise self._out_of_memory(len(batch.samples), exc) from exc
        except Exception as exc:
            if breaks_the_device(exc) or (len(batch.samples) == 1 and not self._forwards_done):
                raise  # (with the device broken, every sample alone would fail too)
            failed = exc
        try:
            return self._isolate(batch, stats, failed)
        finally:
            # the error's traceback holds the frames of the failed forward, with its tensors,
            # and this frame holds the error: that cycle would wait for the collector
            failed = None

    def _isolate(self, batch: _Batch, stats: Mapping[str, ValueStats],
                 failed: Exception) -> tuple[_Batch, _Outputs | None]:
        good = _Batch([], [], list(batch.bad))
        for sample, image in zip(batch.samples, batch.images):
            try:
                self._forward(_Batch([sample], [image], []))
            except Exception as exc:
                if breaks_the_device(exc):  # no sample after it could run: none is at fault
                    raise
                good.bad.append(BadSample(sample.index, sample.sample_id,
                                          f"the model's forward fails on it: {describe_error(exc)}"))
            else:
                good.samples.append(sample)
                good.images.append(image)
        if not good.samples and (len(batch.samples) > 1 or not self._forwards_done):
            raise failed
        log.warning("a batch's forward failed (%s); %d of its samples fail alone and are recorded as bad",
                    describe_error(failed), len(good.bad) - len(batch.bad))
        if self.config.run.strict:
            first = good.bad[len(batch.bad)]
            raise BadSampleError(f"sample {first.sample_id!r} (index {first.index}): {first.reason} "
                                 f"({RunSpec.key('strict')} is set; unset it to record bad samples and go on)")
        return good, (self._forward(good, stats) if good.samples else None)

    def _gpu_share(self) -> float:
        """The part of its GPU this worker holds: a Ray actor's as Ray assigned it, a local
        worker's as the config asks (``auto``: a whole one)."""
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            with contextlib.suppress(Exception):  # not in an actor: no assignment
                share = ray.get_runtime_context().get_assigned_resources().get("GPU")
                if share:
                    return float(share)
        gpus = self.config.run.gpus_per_actor
        return 1.0 if gpus == "auto" else float(gpus)

    def _out_of_memory(self, images: int, exc: BaseException) -> DeviceMemoryError:
        run = self.config.run
        where, shared = str(self.device), False
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            where += f" ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free now)"
            share = self._gpu_share()
            shared = share < 1
            if shared:
                where += (f"; this worker holds {share:g} of the GPU, and the workers that share it each hold their "
                          f"own model and batches there ({RunSpec.key('gpus_per_actor')} {run.gpus_per_actor}; auto "
                          f"shares a GPU from {SHARE_GPU_CPUS} CPUs per GPU)")
        return DeviceMemoryError(f"the forward of a batch of {images} images ran out of memory on {where}: "
                                 f"{describe_error(exc)}; lower {RunSpec.key('batch_size')} (now {run.batch_size})"
                                 + (f" or set {RunSpec.key('gpus_per_actor')}: 1" if shared else ""), shared)

    def _write_layer(self, writer: LayerFileWriter, layer: str, columns: _Columns, outputs: _Outputs) -> None:
        """Encode and write one layer's rows of a batch (the layers are written in parallel)."""
        if outputs.ready is not None:
            outputs.ready.synchronize()
        count = len(columns.ids)
        activations: Any
        if len(outputs.groups) == 1:  # one input size: the rows are in order already, no copy
            activations = _as_numpy(outputs.groups[0][1][layer])
        else:
            activations = outputs.rows(layer, count)
        if self.fixed:
            shapes = ({activations.shape[1:]} if isinstance(activations, np.ndarray)
                      else {a.shape for a in activations})
            expected = self._shapes.setdefault(layer, activations[0].shape)
            if shapes != {expected}:
                raise ShapeChangedError(f"layer {layer!r} gave outputs of shape {sorted(shapes - {expected})[0]} "
                                        f"where {expected} was expected: the inputs differ in size; set "
                                        f"{PreprocessSpec.key('crop')} for one input size, or "
                                        f"{DumpSpec.key('shapes')}: variable")
            if not isinstance(activations, np.ndarray):
                activations = np.stack(activations)
        table = build_table(activations, sample_ids=columns.ids, indices=columns.indices,
                            labels=columns.labels, label_fields=self.label_fields, fixed=self.fixed,
                            label_arrays=self.label_arrays,
                            dtype=self.config.dump.dtype.value,
                            metadata={"reduce": self.config.dump.to_dict(), "model": self.config.model.name,
                                      "layer": layer})
        writer.write(table)

    # -- one shard ---------------------------------------------------------------------------

    def run_shard(self, shard: Shard | Mapping[str, int]) -> ShardRecord:
        """Dump one shard; returns its record (also written to the manifest folder)."""
        self._end_if_broken()
        if isinstance(shard, Mapping):
            shard = Shard(**shard)
        started, started_at = time.perf_counter(), time.time()
        size = self.config.run.batch_size
        stream = self.source.stream(shard.start, shard.stop)
        chunks = [min(size, shard.stop - i) for i in range(shard.start, shard.stop, size)]

        def load(count: int) -> _Batch:  # the next ``count`` samples of the shard, in order
            return self._load(list(itertools.islice(stream, count)))

        layers = self.config.model.layers
        compression = self.config.dump.compression.value
        writers = {layer: LayerFileWriter(self.store, shard.file_name(layer), compression) for layer in layers}
        seconds = {"load_wait": 0.0, "device_wait": 0.0, "forward": 0.0, "write_wait": 0.0}
        stats = {layer: ValueStats() for layer in layers}
        bad: list[BadSample] = []
        pending: list[Future] = []
        loading: Future | None = None
        try:
            loading = self._loader.submit(load, chunks[0]) if chunks else None
            for i in range(len(chunks)):
                if self._stopping.is_set():
                    raise _Stopped(f"shard {shard.id} given up: the worker is stopping")
                t0 = time.perf_counter()
                batch = loading.result()
                t1 = time.perf_counter()
                if i + 1 < len(chunks):
                    loading = self._loader.submit(load, chunks[i + 1])
                outputs = None
                with self._device:
                    t_device = time.perf_counter()
                    if batch.samples:
                        batch, outputs = self._forward_isolating(batch, stats)
                t2 = time.perf_counter()
                bad += batch.bad
                self.metrics.batch(shard.id, len(batch.samples), len(batch.bad))
                for future in pending:
                    future.result()
                t3 = time.perf_counter()
                pending = []
                if outputs is not None:
                    columns = _Columns.of(batch.samples, self.label_fields)
                    pending = [self._writer.submit(self._write_layer, writers[layer], layer, columns, outputs)
                               for layer in layers]
                seconds["load_wait"] += t1 - t0
                seconds["device_wait"] += t_device - t1
                seconds["forward"] += t2 - t_device
                seconds["write_wait"] += t3 - t2
            for future in pending:
                future.result()
            sizes = {layer: writer.commit() for layer, writer in writers.items()}
        except BaseException as exc:
            self.metrics.shard_failed(shard.id)
            if loading is not None:
                loading.cancel()
                with contextlib.suppress(BaseException):
                    loading.result()
            for future in pending:
                with contextlib.suppress(BaseException):
                    future.result()
            for writer in writers.values():
                writer.abort()
            if self._own_process and breaks_the_device(exc):
                self._mark_broken(shard, exc)
            raise
        finally:
            stream.close()  # the source's open files and buffers go now, not when collected
        seconds["total"] = time.perf_counter() - started
        rows = {layer: writer.rows for layer, writer in writers.items()}
        record = ShardRecord(
            shard=shard.id, start=shard.start, stop=shard.stop, rows=rows,
            files={layer: shard.file_name(layer) for layer in layers if rows[layer]},
            bytes={layer: size for layer, size in sizes.items() if size},
            index_range={layer: w.index_range for layer, w in writers.items() if w.index_range}, bad=tuple(bad),
            seconds={k: round(v, 4) for k, v in seconds.items()},
            started=round(started_at, 3), finished=round(time.time(), 3), worker=self.info(),
            stats={layer: s.to_dict() for layer, s in stats.items()})
        document = record.to_dict()
        self.store.write_json(shard_record_path(shard.id), document)
        self.metrics.shard_done(shard.id, document)
        return record

    def progress(self) -> dict[int, int]:
        """The samples done so far of each shard this worker is running (for the driver)."""
        self._end_if_broken(grace=BROKEN_GRACE)  # (asked twice a second: after the shard's error has gone)
        return self.metrics.in_flight()

    def probe(self, tries: int = 8) -> dict[str, LayerSpec]:
        """Run the first readable sample through the whole path, writing nothing.

        Returns how each layer is stored (shape and dtype); raises :class:`ConfigError` when
        none of the first ``tries`` samples can be read, nor ``tries`` more spread over the rest
        (a dataset whose first rows are bad is not refused: a wrong column or decoder is), or
        when the forward or the encoding fails (a layer that gives no tensor, a selector that
        does not fit its output, a reduction that does not fit, ...).
        """
        count = len(self.source)
        tries = min(tries, count)
        batch = self._load(self.source.read(range(tries)))
        bad = batch.bad
        spread = sorted({tries + (count - tries) * k // tries for k in range(tries)} if count > tries else ())
        if not batch.samples and spread:
            batch = self._load(self.source.read(spread))
        if not batch.samples:
            reasons = "; ".join(f"{b.sample_id}: {b.reason}" for b in bad[:3])
            tried = (f"the {count} samples" if tries == count else
                     f"the first {tries} samples, nor any of {len(spread)} more spread over all {count:,},")
            raise ConfigError(Config.key("source"), f"none of {tried} can be read ({reasons})")
        first = _Batch(batch.samples[:1], batch.images[:1], [])
        try:
            if self._layouts is None and self.channels_at_end:  # (found by forwards not counted below)
                self._forward(first)
            with self.outputs.counting() as calls:
                outputs = self._forward(first)
            layers = {}
            for layer in self.config.model.layers:
                array = outputs.rows(layer, 1)[0]
                shape = array.shape if self.fixed else None
                layers[layer] = LayerSpec(shape, self.config.dump.dtype.value, self._layouts.get(layer))
                self._write_layer(_DiscardingWriter(), layer, _Columns.of(first.samples, self.label_fields), outputs)
            if self.config.run.batch_size > 1:
                self._trial_of_two(first)
            self._warn_of_repeated_calls(first, dict(calls))
        except ConfigError:
            raise  # names its own key (a pass-through column that takes an output column's name)
        except OutputSelectionError as exc:  # a selector that does not fit the layer's output
            raise ConfigError(ModelSpec.key("layers"), str(exc)) from None
        except Exception as exc:  # the model's own errors too (an assert on its input's size, a KeyError)
            # (outside the model, only those that were config errors before: another is a bug
            # of the pipeline's, which keeps its traceback)
            ours = not _raised_in(exc, LayerOutputs.forward) and not isinstance(exc, (RuntimeError, ValueError, TypeError))
            if ours or not is_config_fault(exc):
                raise
            raise ConfigError(Config.key("model"), f"a trial forward of sample {first.samples[0].sample_id!r} "
                              f"failed: {describe_failure(exc)}{self._trial_hint(exc, first.images[0])}") from None
        return layers

    def _trial_of_two(self, first: _Batch) -> None:
        """The trial's sample twice in one batch: an output whose first dim is not the batch's
        (an RNN's state) shows. A model that takes it alone but not two at once is told to take
        batches of one."""
        try:
            self._forward(_Batch(first.samples * 2, first.images * 2, []))
        except LayerOutputError:
            raise
        except Exception as exc:
            if not is_config_fault(exc):
                raise
            raise ConfigError(RunSpec.key("batch_size"), f"the model takes sample {first.samples[0].sample_id!r} "
                              f"alone but fails on a batch of two ({describe_failure(exc)}); set "
                              f"{RunSpec.key('batch_size')}: 1 if it takes one input at a time") from None

    def _warn_of_repeated_calls(self, batch: _Batch, kept: Mapping[str, int]) -> None:
        """A warning for each wanted layer whose module the model calls more than once in a
        forward (``kept``: the calls in the trial's forward, up to where it stopped): which call
        is stored changes with the mode, ``stop_early`` and the other layers."""
        total = kept
        if self.outputs.stops_early:  # the calls after the stop: one whole forward
            with torch.inference_mode(), self._autocast():
                total = self.outputs.whole_calls(self._model_input(batch))
        for layer in self.outputs.layers:
            if total.get(layer, 0) > 1:
                log.warning("layer %r runs %d times in a forward of the model, and this run stores the output of "
                            "its call %d of %d; which call is stored changes with %s, %s and the other layers "
                            "dumped: dump a layer that runs once to be sure which output it is (`actmap layers "
                            "MODEL --input-size ...` counts the calls)", layer, total[layer], kept.get(layer, 0),
                            total[layer], ModelSpec.key("mode"), ModelSpec.key("stop_early"))

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast to ``model.precision``, where it asks for one."""
        precision = self.config.model.precision
        return (torch.autocast(self.device.type, dtype=_AUTOCAST[precision])
                if precision in _AUTOCAST else contextlib.nullcontext())

    def _model_input(self, batch: _Batch) -> torch.Tensor:
        """The model's input for the first sample of ``batch``, on the device."""
        return to_model_input(stack_images(batch.images[:1]).to(self.device), self.mean_std,
                              self.config.model.channels_last)

    def _find_layouts(self, x: torch.Tensor, outputs: Mapping[str, Any],
                      first_calls: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
        """The layout of each layer that gives 4-d maps in ``outputs``, the forward's of the
        batch ``x`` (whose layers' first calls gave ``first_calls``): from the model run again
        on its first sample stacked to twice its height, then to twice its width, up to the
        wanted layers (:func:`layout_from_growth`; the first calls' shapes are compared, so a
        layer whose output is not its first call's, in a model that calls it again in another
        shape, is told by its proportions);
        convolutions, batch norms and pooling layers are channels-first without a run. Token
        reductions take no maps: nothing to find. Windows of tokens (:func:`windows_from_growth`)
        are no maps to pool: a :class:`ConfigError` for ``pool`` and ``channel_mean``."""
        if self.config.dump.reduce in (Reduction.CLS, Reduction.MEAN):
            return {}

        refused: list[str] = []

        def grown(dim: int) -> dict[str, tuple[int, ...]]:
            """The wanted layers' shapes for the first sample twice over along ``dim``: those
            that ran before the model refused the size, if it does (asserting its input's size,
            or using a grid of the size it was built for after them)."""
            with torch.inference_mode(), self._autocast(), self.outputs.stopping_early(), \
                    self.outputs.shapes_seen() as seen:
                try:
                    self.outputs(torch.cat([x[:1], x[:1]], dim=dim))
                except Exception as exc:
                    if breaks_the_device(exc):
                        raise
                    refused.append(describe_error(exc))
            return seen

        base = {layer: tuple(out.shape) for layer, out in outputs.items()
                if isinstance(out, torch.Tensor) and out.ndim == 4}
        told = self.channels_at_end.intersection(base)
        taller, wider = (grown(2), grown(3)) if told else ({}, {})
        grew = {layer: (taller.get(layer), wider.get(layer)) if first_calls.get(layer) == base[layer] else (None, None)
                for layer in told}
        pooled = self.config.dump.reduce in (Reduction.POOL, Reduction.CHANNEL_MEAN)
        windows = sorted(layer for layer in told if windows_from_growth(base[layer], *grew[layer], batch=len(x)))
        if windows and pooled:
            raise ConfigError(DumpSpec.key("reduce"),
                              _windows_refused(windows[0], base[windows[0]][1:], self.config.dump.reduce))
        layouts = {layer: layout_from_growth(shape, *grew[layer], x.shape[-2:], self.declares_channels_last,
                                             batch=len(x))
                   if layer in told else CHANNELS_FIRST for layer, shape in base.items()}
        if pooled:
            self._warn_of_proportions(x.shape[-2:], len(x), base, layouts, grew, refused)
        return layouts

    def _warn_of_proportions(self, image: Sequence[int], batch: int, shapes: Mapping[str, tuple[int, ...]],
                             layouts: Mapping[str, str], grew: Mapping[str, tuple], refused: Sequence[str]) -> None:
        """Warnings for the pooled layers whose layout growth did not tell: where the model took
        no input of twice the size, which layouts their proportions gave; where those have the
        proportions of no image's maps, that pooling them means little."""
        guessed = sorted(layer for layer, (taller, wider) in grew.items()
                         if layout_by_growth(shapes[layer], taller, wider, batch) is None)
        unknown = [layer for layer in guessed if None in grew[layer]]
        if refused and unknown:
            log.warning("the model takes no input of twice the height or width of %dx%d (%s), so the layout of "
                        "its maps is told by their proportions%s: %s", *image, refused[0],
                        " and its output_fmt" if self.declares_channels_last else "",
                        ", ".join(f"{layer} {shapes[layer][1:]} {layouts[layer]}" for layer in unknown))
        gridless = [layer for layer in guessed if fits_no_grid(shapes[layer], image)]
        if gridless:
            log.warning("%s: the proportions of no %dx%d image's maps in either layout per sample, and how they grow "
                        "with the input does not tell: pooled as %s, they may be no maps at all (windows of tokens, "
                        "attention) and their pooled values mean little; reduce: none keeps them as they are",
                        ", ".join(f"{layer} {shapes[layer][1:]}" for layer in gridless), *image,
                        " / ".join(sorted({layouts[layer] for layer in gridless})))

    def _trial_hint(self, exc: Exception, image: torch.Tensor) -> str:
        """What may fix a trial forward that failed inside the model (the pipeline's own errors
        say what to do themselves): weights in another precision than the inputs need
        ``model.precision`` (bf16, fp16: autocast casts the inputs, and the weights, to it) or a
        float32 model; anything else may be an input of another size than the model takes."""
        if not _raised_in(exc, LayerOutputs.forward) or isinstance(exc, PipelineError):
            return ""
        fed = _AUTOCAST.get(self.config.model.precision, torch.float32)
        weights = {p.dtype for p in self.outputs.wrapper.wrapped_model.parameters() if p.is_floating_point()}
        odd = sorted(weights - {torch.float32, fed}, key=str)
        if odd:
            key, names = ModelSpec.key("precision"), " and ".join(_dtype_name(d) for d in odd)
            fits = [precision.value for precision, dtype in _AUTOCAST.items() if dtype in odd]
            fix = (f"set {key}: {fits[0]}, whose autocast casts the inputs to "
                   f"{_dtype_name(_AUTOCAST[Precision(fits[0])])}, or convert the model to float32 in its builder"
                   if fits else f"convert the model to float32 in its builder; {key} takes "
                   f"{', '.join(p.value for p in Precision)}")
            return f" (the model's weights are {names} but its inputs {_dtype_name(fed)}: {fix})"
        return (f" (its input was {'x'.join(map(str, image.shape))}: if the model takes another size, set "
                f"{PreprocessSpec.key('crop')} (or {PreprocessSpec.key('resize')}) to it, or build the model "
                f"for this one through {ModelSpec.key('kwargs')})")

    def stop(self) -> None:
        """Have the shards in flight give up at their next batch (their files are dropped)."""
        self._stopping.set()

    def close(self) -> None:
        """Stop the threads and take the hooks off the model (safe to call twice)."""
        self._loader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self.decoder.close()
        if hasattr(self.source, "close"):
            self.source.close()
        self.outputs.remove()

    def __enter__(self) -> ShardWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
