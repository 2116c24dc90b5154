"""Reading a dump back: one layer as an array, a streaming torch ``Dataset``, a Ray dataset,
and a description of what the dump holds.

Only the on-disk contract is used (the Parquet files, their JSON metadata and the manifest),
so this works on any dump, finished or not, local or remote.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from ._encoding import bfloat16_to_float32, decode_fixed, decode_variable, read_metadata, schema_metadata
from ._integrity import Damage, check_dump, index_damage, mend_by_redo, page_problem, parallel_map
from ._layout import (ACTIVATION, INDEX, MANIFEST_PATH, SHARDS_DIR, file_shard, is_owned, is_shard_record,
                      partition_dir, partition_layer, shape_column, shape_columns)
from ._lock import running_on
from ._manifest import read_manifest
from ._records import BadSample, LayerSpec, Manifest
from ._report import bad_sample_lines, layer_lines, sorted_bad
from ._store import OutputStore
from .config import RunSpec
from .errors import DamagedDumpError, UnknownDumpLayerError, close_matches
from ._sources._base import describe_error
from ._shuffle import block_shuffle, groups_per_window
from ._stats import merge_records


def _layer_files(store: OutputStore, layer: str) -> list[str]:
    """The data files of ``layer``, once each is checked against its shard's record (and the
    manifest's plan): a dump whose files contradict them is refused, naming each file."""
    manifest = read_manifest(store)
    layers = list(manifest.layers) if manifest else dump_layers(store)
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a layer id (a str), got {layer!r}; {store.location!r} holds "
                        f"{', '.join(map(repr, layers)) or 'no layer yet'}")
    checked = check_dump(store, manifest.plan if manifest else None, [layer] if layer in layers else [],
                         layer_info=manifest.layer_info if manifest else None)
    files = sorted(checked.files.get(layer, ()))  # (a folder `layer=...` beside the dump is none of its layers)
    if manifest is None and checked.records:  # no plan to hold the other files to: those the records vouch for
        vouched = {path for record in checked.records.values() for named, path in record.files.items() if named == layer}
        files = [path for path in files if path in vouched]
    if checked.damage and layer in layers:  # (a layer whose files are all gone too)
        raise DamagedDumpError(f"{store.location!r} is damaged: its files contradict its records, so its rows "
                               f"cannot be trusted: {_listed(checked.damage)}. Rerun the command that made it: "
                               "the rerun checks every file, redoes those shards and deletes the files of shards the "
                               "dump has not (`actmap inspect` lists the damage)")
    if not files:
        hint = ("none of its shards is finished yet: rerun the command that made the dump to finish it "
                "(`actmap inspect` tells how far it is)" if layer in layers
                else close_matches(layer, layers) if layers
                else "it holds no layer yet" if store.entries() else "it is empty or does not exist")
        raise UnknownDumpLayerError(f"{store.location!r} holds no rows of layer {layer!r}; {hint}")
    return files


def _without_manifest(store: OutputStore) -> DamagedDumpError | None:
    """For a folder without a manifest and no run at work on it (a run writes its manifest first,
    under its lock): the error that says it holds a dump's files without its manifest, if it does."""
    leftovers = [f for f in store.list_files(SHARDS_DIR) if is_shard_record(f)][:3]
    leftovers += [e for e in store.entries() if partition_layer(e) is not None]
    if not leftovers:
        return None
    return DamagedDumpError(f"{store.location!r} holds the files of an actmap dump without its manifest "
                            f"({', '.join(leftovers[:5])}): they cannot be checked or resumed (no {MANIFEST_PATH}); "
                            "rerun the command that made it with --overwrite to redo the dump")


def _foreign_files(store: OutputStore, layer: str) -> list[str]:
    """The files in ``layer``'s folder that the dump did not write and that readers of a folder
    of Parquet files take in (not hidden, not named with a leading ``_``), as a copy
    ``part-00001 (1).parquet`` put there by hand."""
    return sorted(path for path in store.list_files(partition_dir(layer)) if not is_owned(path)
                  and not any(part.startswith((".", "_")) for part in path.split("/")[1:]))


def _listed(damage: Sequence[object], limit: int = 5) -> str:
    return "; ".join(map(str, damage[:limit])) + (f"; and {len(damage) - limit} more" if len(damage) > limit else "")


def _name_damaged_pages(store: OutputStore, files: Sequence[str], error: Exception) -> None:
    """After a read failed with ``error``: :class:`DamagedDumpError` naming the files whose pages
    do not read back (their size and footer passed the check), if any."""
    damage = [Damage(f, reason, file_shard(f)) for f in files if (reason := page_problem(store, f))]
    if damage:
        raise DamagedDumpError(f"{store.location!r} is damaged: {'; '.join(map(mend_by_redo, damage))}") from error


#: Parquet scans that verify each page's checksum (files written by actmap carry them).
_FORMAT = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
    page_checksum_verification=True))


def dump_layers(store: OutputStore | str) -> list[str]:
    """The layers a dump holds files of: its partition folders, but those of layers its manifest
    does not name (a folder ``layer=...`` put beside the dump is none of its layers)."""
    store = store if isinstance(store, OutputStore) else OutputStore(store)
    manifest = read_manifest(store)
    return [layer for layer in _partition_layers(store) if manifest is None or layer in manifest.layers]


def _partition_layers(store: OutputStore) -> list[str]:
    """The layers of the partition folders in ``store``, the dump's or not."""
    return [layer for layer in map(partition_layer, store.entries()) if layer is not None]


def _to_array(values: np.ndarray, dtype: str, as_torch: bool) -> np.ndarray | torch.Tensor:
    """``values`` as numpy (bfloat16 widened to float32) or as a torch tensor (bfloat16 kept).
    A tensor is the caller's to write to: values that lie in Arrow's read-only buffers are
    copied first (torch would warn, and an in-place op would write into Arrow's memory).

    >>> frozen = np.arange(3, dtype=np.float32); frozen.flags.writeable = False
    >>> tensor = _to_array(frozen, "float32", as_torch=True).mul_(2)
    >>> tensor.tolist(), frozen.tolist()
    ([0.0, 2.0, 4.0], [0.0, 1.0, 2.0])
    """
    if not as_torch:
        return bfloat16_to_float32(values) if dtype == "bfloat16" else values
    values = np.require(values, requirements=("C", "W"))
    if dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


def read_table(location: str, layer: str, start: int | None = None, stop: int | None = None,
               columns: Sequence[str] | None = None, indices: Sequence[int] | None = None) -> pa.Table:
    """The rows of ``layer`` whose source index is in ``[start, stop)`` (and in ``indices``, when
    given), sorted by index; ``columns`` picks columns by name (all by default; ``[]``: none, the
    rows' count only). A variable-shape tensor column comes with its ``<name>_shape`` column,
    which :func:`decode_column` needs.

    Raises ``TypeError`` for a ``start`` or ``stop`` that is not an int, for ``columns`` that
    are not a list of names and for ``indices`` that are not a list of ints (a numpy array or
    torch tensor of them will do), and ``ValueError`` naming a column the layer does not have,
    or one named twice.
    """
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be an int (a source index) or None, got {value!r}")
    # (an index is an int64: bounds beyond it are the same as its ends)
    start, stop = (None if v is None else min(max(int(v), _INT64.min), _INT64.max) for v in (start, stop))
    if isinstance(columns, str) or (columns is not None and not all(isinstance(c, str) for c in columns)):
        raise TypeError(f"columns must be a list of column names, got {columns!r}")
    wanted = None if indices is None else _index_array(indices)
    store = OutputStore(location)
    files = [store.path(f) for f in _layer_files(store, layer)]
    dataset = ds.dataset(files, format=_FORMAT, filesystem=store.fs)
    for column in columns or ():
        if column not in dataset.schema.names:
            raise ValueError(f"layer {layer!r} of {location!r} has no column {column!r}; "
                             f"{close_matches(column, dataset.schema.names)}")
    if columns is not None:
        twice = [c for c, n in collections.Counter(columns).items() if n > 1]
        if twice:
            raise ValueError(f"columns lists {', '.join(map(repr, twice))} more than once; name each column once")
        variable = _variable_columns(dataset.schema)
        shapes = [shape_column(c) for c in columns if c in variable]
        columns = list(columns) + [c for c in shapes if c not in columns]
    condition = None
    if start is not None:
        condition = pc.field(INDEX) >= start
    if stop is not None:
        upper = pc.field(INDEX) < stop
        condition = upper if condition is None else condition & upper
    if wanted is not None:
        chosen = pc.field(INDEX).isin(pa.array(wanted, pa.int64()))
        condition = chosen if condition is None else condition & chosen
    read = None if columns is None else list(columns) + ([] if INDEX in columns else [INDEX])  # to sort by
    try:
        table = dataset.to_table(filter=condition, columns=read)
    except OSError as exc:
        _name_damaged_pages(store, [store.relative(f) for f in files], exc)
        raise
    table = table.sort_by(INDEX).replace_schema_metadata(dataset.schema.metadata)
    return table if columns is None else table.select(columns)  # (selected last: a table of no column keeps its rows)


def _variable_columns(schema: pa.Schema) -> list[str]:
    """The tensor columns of variable shapes that ``schema``'s metadata describes."""
    return [name for name, spec in read_metadata(schema)["columns"].items() if spec["shape"] is None]


_INT64 = np.iinfo(np.int64)


def _index_array(indices: object) -> np.ndarray:
    """``read_table``'s ``indices`` as one int64 array, or a ``TypeError`` that shows them."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    elif isinstance(indices, (pa.Array, pa.ChunkedArray)):  # another table's column
        indices = indices.to_numpy(zero_copy_only=False)
    array = None
    if not isinstance(indices, (str, bytes)) and hasattr(indices, "__iter__"):
        array = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices))
    if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        shown = repr(indices) if len(repr(indices)) <= 80 else repr(indices)[:77] + "..."
        raise TypeError(f"indices must be a list of ints (source indices), a 1-d integer array or None, got {shown}")
    if array.size and array.dtype == np.uint64 and int(array.max()) > _INT64.max:
        raise ValueError(f"indices hold {int(array.max())}, beyond any source index (at most {_INT64.max})")
    return array.astype(np.int64)


def decode_column(table: pa.Table, column: str = ACTIVATION, as_torch: bool = False):
    """The tensor column of a dump table as one ``(N, ...)`` array (a list for variable shapes).

    bfloat16 values come back as float32 in numpy (exact) and as bfloat16 in torch. A
    ``ValueError`` names a ``column`` that is no tensor column, or that the table lacks (or,
    for variable shapes, lacks its ``<column>_shape``).
    """
    specs = read_metadata(table.schema)["columns"]
    tensors = ", ".join(map(repr, specs))
    if column not in specs:
        held = (f"holds no tensor (read its values with table.column({column!r}))" if column in table.column_names
                else "is not in the table")
        raise ValueError(f"column {column!r} {held}; the table's tensor columns: {tensors}")
    spec = specs[column]
    needed = [column] + ([shape_column(column)] if spec["shape"] is None else [])
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"the table lacks {' and '.join(map(repr, missing))}, which decoding {column!r} needs: "
                         f"read {'them' if len(missing) > 1 else 'it'} too (read_table(..., columns=[...]) adds "
                         "the shapes of a variable-shape column by itself)")
    if spec["shape"] is not None:
        return _to_array(decode_fixed(table.column(column), spec), spec["dtype"], as_torch)
    arrays = decode_variable(table.column(column), table.column(shape_column(column)), spec)
    return [_to_array(a, spec["dtype"], as_torch) for a in arrays]


def read_layer(location: str, layer: str, start: int | None = None, stop: int | None = None,
               as_torch: bool = False) -> np.ndarray | torch.Tensor | list:
    """The activations of ``layer`` for the samples with source index in ``[start, stop)``.

    Returns one ``(N, ...)`` array (or tensor), rows sorted by index; a list of arrays when the
    dump stores variable shapes. The ids, indices and labels: :func:`read_table`.
    """
    table = read_table(location, layer, start, stop)
    return decode_column(table, ACTIVATION, as_torch)


def _count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int of at least {least}, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be an int of at least {least}, got {value!r}")


def _torch_dtype(dtype: object) -> torch.dtype | None:
    """``dtype`` as a torch dtype: one already, its name (``"float16"``), a numpy dtype, or None.

    >>> _torch_dtype("bfloat16"), _torch_dtype(np.float16), _torch_dtype(None)
    (torch.bfloat16, torch.float16, None)
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    try:
        return torch.from_numpy(np.empty(0, np.dtype(dtype))).dtype
    except (TypeError, ValueError):
        raise TypeError(f"dtype must be a torch dtype (torch.float16), its name ('float16') or None (the stored "
                        f"dtype), got {dtype!r}") from None


#: The dtypes activations (floats) may be served in.
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _float_dtype(dtype: object) -> torch.dtype | None:
    """:func:`_torch_dtype`, refusing what is no floating-point dtype (it would truncate the values).

    >>> _float_dtype("int8")
    Traceback (most recent call last):
    ...
    ValueError: dtype must be a floating-point dtype (torch.float32, torch.float16, torch.bfloat16, torch.float64) or None (the stored dtype), got torch.int8, which would truncate the activations (floats)
    """
    dtype = _torch_dtype(dtype)
    if dtype is not None and dtype not in _FLOATS:
        raise ValueError(f"dtype must be a floating-point dtype ({', '.join(map(str, _FLOATS))}) or None (the stored "
                         f"dtype), got {dtype}, which would truncate the activations (floats)")
    return dtype


class ActivationDataset(torch.utils.data.Dataset):
    """The rows of one layer as ``(activation, labels)`` pairs, streamed from disk.

    Only the Parquet row groups in use are held in memory (a few at a time), so a dump larger
    than memory trains as well as a small one; ``labels`` is a dict of the row's other columns
    (``sample_id``, ``index``, ``label``, ``mask``, ...), tensor columns decoded to tensors.
    Works with a ``DataLoader`` and its worker processes.

    Args:
        location: the dump's root folder.
        layer: the layer id.
        dtype: the activations' torch dtype (``torch.float32`` by default, or its name:
            ``"float16"``; ``None`` keeps the stored dtype).
        shuffle: serve the rows in a block-shuffled order (:mod:`pipeline._shuffle`): row groups in
            a random order, rows shuffled within windows of ``window`` rows; item ``i`` is then the
            ``i``-th row of that order, so a ``DataLoader`` without a sampler gets shuffled batches
            while each row group is still read once. :meth:`set_epoch` draws a new order.
        window: rows shuffled together (the row groups of one window are held in memory).
        seed: the seed of the order (with the epoch).
    """

    def __init__(self, location: str, layer: str, dtype: torch.dtype | None = torch.float32,
                 cache_row_groups: int = 4, shuffle: bool = False, window: int = 1024, seed: int = 0):
        _count("cache_row_groups", cache_row_groups, 0 if shuffle else 1)  # (shuffled: at least a window's)
        if shuffle:
            _count("window", window, 1)
            _count("seed", seed, 0)
        store = OutputStore(location)
        self.location, self.layer, self.dtype = store.location, layer, _float_dtype(dtype)
        self._files = [store.path(f) for f in _layer_files(store, layer)]
        self._fs = store.fs
        self._groups: list[tuple[int, int]] = []  # (file, row group)
        offsets = [0]
        for f, path in enumerate(self._files):
            with self._fs.open_input_file(path) as handle:
                meta = pq.ParquetFile(handle).metadata
            for g in range(meta.num_row_groups):
                self._groups.append((f, g))
                offsets.append(offsets[-1] + meta.row_group(g).num_rows)
        self._offsets = offsets
        self._cache: collections.OrderedDict[tuple[int, int], dict] = collections.OrderedDict()
        self._cache_size = cache_row_groups
        self.shuffle, self.window, self.seed = shuffle, window, seed
        self._order = None
        if shuffle:
            sizes = list(np.diff(offsets))
            self._cache_size = max(cache_row_groups, groups_per_window(sizes, window) + 1)
            self.set_epoch(0)
        # open files: (reader, the handle it reads, which ParquetFile.close leaves open)
        self._readers: collections.OrderedDict[int, tuple[pq.ParquetFile, Any]] = collections.OrderedDict()

    def __len__(self) -> int:
        return self._offsets[-1]

    def set_epoch(self, epoch: int) -> None:
        """Draw the shuffled order of ``epoch`` (a pure function of seed and epoch); no-op unshuffled.

        With ``DataLoader`` worker processes, call it before each epoch's iterator is made.
        """
        if self.shuffle:
            _count("epoch", epoch, 0)
            self._order = block_shuffle(list(np.diff(self._offsets)), self.window, self.seed + epoch * 1_000_003)

    def __getstate__(self) -> dict:  # DataLoader workers open their own files
        state = dict(self.__dict__)
        state["_readers"], state["_cache"] = collections.OrderedDict(), collections.OrderedDict()
        return state

    def _reader(self, f: int) -> pq.ParquetFile:
        """The open file ``f``; a few stay open, the least recently used is closed."""
        if f in self._readers:
            self._readers.move_to_end(f)
        else:
            handle = self._fs.open_input_file(self._files[f])
            self._readers[f] = (pq.ParquetFile(handle, page_checksum_verification=True), handle)
            if len(self._readers) > self._cache_size:
                self._readers.popitem(last=False)[1][1].close()
        return self._readers[f][0]

    def close(self) -> None:
        """Close the open files (the dataset stays usable: it opens them again when asked)."""
        while self._readers:
            self._readers.popitem()[1][1].close()
        self._cache.clear()

    def _group(self, slot: int) -> dict:
        """The decoded columns of row group ``slot`` (of ``self._groups``)."""
        key = self._groups[slot]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            table = self._reader(key[0]).read_row_group(key[1])
        except OSError as exc:
            store = OutputStore(self.location)  # (only here: on object storage a store may cost a request)
            _name_damaged_pages(store, [store.relative(self._files[key[0]])], exc)
            raise
        expected = self._offsets[slot + 1] - self._offsets[slot]
        if table.num_rows != expected:  # (the footer said otherwise when the dataset was made)
            store = OutputStore(self.location)
            raise DamagedDumpError(f"{self.location!r} is damaged: {store.relative(self._files[key[0]])}: its row "
                                   f"group {key[1]} holds {table.num_rows:,} rows, its footer said {expected:,} "
                                   "(changed since the dataset was made?); make the dataset anew, and if it says so "
                                   "again, rerun the command that made the dump")
        specs = read_metadata(table.schema)["columns"]
        companions = shape_columns(specs)
        decoded = {}
        for name in table.column_names:
            if name in specs:
                decoded[name] = decode_column(table, name, as_torch=True)
            elif name not in companions:
                decoded[name] = table.column(name).to_pylist()
        self._cache[key] = decoded
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return decoded

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        try:
            asked = i = operator.index(i)
        except TypeError:
            raise TypeError(f"an item's index is an int, got {i!r}; for many rows at once use a DataLoader, or "
                            "read_table(location, layer, indices=...)") from None
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {asked} out of range for {len(self)} rows")
        if self._order is not None:
            i = int(self._order[i])
        slot = bisect.bisect_right(self._offsets, i) - 1
        row = i - self._offsets[slot]
        group = self._group(slot)
        # a copy: the row group stays cached, and a caller may change what it gets in place
        activation = group[ACTIVATION][row].to(self.dtype or group[ACTIVATION][row].dtype, copy=True)
        labels = {name: values[row] for name, values in group.items() if name != ACTIVATION}
        return activation, labels


def to_ray_dataset(location: str, layer: str):
    """The rows of ``layer`` as a ``ray.data.Dataset`` with the activation as a tensor column
    (bfloat16 widened to float32), for training on a cluster."""
    import ray

    store = OutputStore(location)
    files = [store.path(f) for f in _layer_files(store, layer)]
    with store.fs.open_input_file(files[0]) as handle:
        # Ray Data's batches drop the schema metadata: read it here and ship it with the function
        specs = read_metadata(pq.read_schema(handle))["columns"]
    metadata = schema_metadata(specs)
    companions = shape_columns(specs)

    def decode(batch: pa.Table) -> dict[str, Any]:
        batch = batch.replace_schema_metadata(metadata)
        out: dict[str, Any] = {}
        for name in batch.column_names:
            if name in specs:
                out[name] = decode_column(batch, name)
                if isinstance(out[name], list):  # one array per row, each of its own shape
                    out[name] = _row_arrays(out[name])
            elif name not in companions:
                out[name] = batch.column(name).to_numpy(zero_copy_only=False)
        return out

    return ray.data.read_parquet(files, filesystem=store.fs).map_batches(decode, batch_format="pyarrow")


def _row_arrays(arrays: list[np.ndarray]) -> np.ndarray:
    """``arrays`` as a 1-d object array of them, as Ray Data takes a column of tensors that may
    differ in shape (``np.array(arrays, dtype=object)`` would try to broadcast them into one
    array: an error for some shapes, and a stack of Python floats for rows of one shape).

    >>> rows = _row_arrays([np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32)])
    >>> rows.shape, rows[1].shape, rows[1].dtype
    ((2,), (2, 4), dtype('float32'))
    """
    rows = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        rows[i] = array
    return rows


@dataclasses.dataclass
class DumpInfo:
    """What a dump holds: see :func:`inspect_dump`.

    ``manifest`` is the dump's (``None``: a run at work has not written it yet); ``layers`` holds each layer's ``rows``, stored ``shape`` (``None``: each row has its own) and
    ``dtype``, ``files``, ``bytes`` and ``columns`` (and the ``layout`` of its maps, where the
    manifest records it: ``channels_first`` or ``channels_last``); ``bad`` one dict per bad sample of the
    shards done (its index, id and reason); ``damage`` one line per file that is not what the
    dump's records say (each naming the file); ``running`` who holds the dump's lock, while a
    run is at work on it; ``notes`` what else the folder holds that is none of the dump's (a
    layer folder its manifest does not name).
    """

    location: str
    manifest: Manifest | None
    layers: dict[str, dict]
    shards_done: int
    shards_planned: int | None
    bad: list[dict]
    damage: list[str] = dataclasses.field(default_factory=list)
    running: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every planned shard is done, and each sample is in each layer exactly once
        (but the bad samples)."""
        return self.shards_planned is not None and self.shards_done == self.shards_planned and not self.damage

    def format(self, bad_limit: int = 20) -> str:
        lines = [f"dump: {self.location}"]
        if self.manifest:
            m = self.manifest
            lines.append(f"model: {m.model['name']} (weights {m.model['weights_sha256'][:12]}), "
                         f"source: {m.source.get('kind')} of {m.plan.samples:,} samples")
        planned = "?" if self.shards_planned is None else self.shards_planned
        state = ("complete" if self.complete else "DAMAGED" if self.damage
                 else f"INCOMPLETE (a run is at work on it: {self.running})" if self.running
                 else "INCOMPLETE (rerun the same command to finish)")
        lines.append(f"shards: {self.shards_done}/{planned} done, {state}")
        for layer, i in self.layers.items():  # each layer's line, then its values when counted
            lines += layer_lines({layer: LayerSpec.from_dict(i)}, {layer: i["rows"]}, {layer: i["bytes"]},
                                 indent="  ", label="layer ",
                                 extra={layer: f"{i['files']} files, columns: {', '.join(i['columns'])}"})
            if i.get("values"):
                lines.append(f"    values: {i['values'].format()}")
        lines.append(f"bad samples: {len(self.bad)}")
        lines += bad_sample_lines([BadSample.from_dict(b) for b in self.bad], limit=bad_limit, indent="  ",
                                  more="... and {rest} more")
        if self.damage:
            lines.append(f"damage: {len(self.damage)} problem(s); the readers refuse the dump until they are "
                         "mended: a rerun of the same command redoes their shards, unless the line says otherwise")
            lines += [f"  {line}" for line in self.damage]
        lines += [f"note: {line}" for line in self.notes]
        return "\n".join(lines)


def inspect_dump(location: str, verify: bool = False) -> DumpInfo:
    """Describe a dump: layers (rows, shape, dtype, files, bytes, columns), completeness, bad
    samples, and damage: each file is checked against its shard's record, and its index column
    read, so that each sample of the shards done is proven to be in each layer exactly once.
    With ``verify``, every page of every file is read and checked against its checksum too.

    Raises ``FileNotFoundError`` for a folder that holds no dump (no manifest, and no run at
    work that is about to write one), and :class:`DamagedDumpError` for one that holds a
    dump's files without its manifest."""
    store = OutputStore(location)
    if not store.entries():
        raise FileNotFoundError(f"{location!r} is empty or does not exist: no dump there")
    manifest = read_manifest(store)
    running = running_on(store)
    if manifest is None and running is None:
        if (error := _without_manifest(store)) is not None:
            raise error
        raise FileNotFoundError(f"{location!r} holds no actmap dump (no {MANIFEST_PATH}); give the folder "
                                f"a run wrote (its {RunSpec.key('output')})")
    # the manifest's layers: a folder `layer=...` beside them is none of the dump's, and not checked
    layer_ids = list(manifest.layers) if manifest else dump_layers(store)
    stray = [layer for layer in _partition_layers(store) if layer not in layer_ids]
    checked = check_dump(store, manifest.plan if manifest else None, layer_ids,
                         layer_info=manifest.layer_info if manifest else None)
    records = checked.records
    damage: list[Damage] = list(checked.damage)
    unseen: list[Damage] = []  # damage a rerun does not find by itself
    layers = {}
    for layer in layer_ids:
        files = sorted(checked.files[layer])
        rows, size, schema = 0, 0, None
        readable = []
        damaged = {d.path for d in damage}
        for f in files:
            size += checked.files[layer][f]
            try:
                with store.fs.open_input_file(store.path(f)) as handle:
                    parquet = pq.ParquetFile(handle)
                    rows += parquet.metadata.num_rows
                    schema = schema or (None if f in damaged else parquet.schema_arrow)
            except Exception as exc:  # named as damage (by the check, or here)
                if f not in damaged:
                    damage.append(Damage(f, f"unreadable ({describe_error(exc)})", file_shard(f)))
                continue
            readable.append(f)
        if schema is None:  # (no file, or none undamaged: the damage names them)
            continue
        spec = read_metadata(schema)["columns"][ACTIVATION]
        layers[layer] = {"rows": rows, "shape": spec["shape"], "dtype": spec["dtype"], "files": len(files),
                         "bytes": size, "columns": schema.names}
        known = manifest.layer_info.get(layer) if manifest else None
        if known is not None and known.layout is not None:  # how the model laid out its maps
            layers[layer]["layout"] = known.layout
        # each sample of the shards done, in each layer, exactly once
        damaged = {d.path for d in damage}
        recorded = [(f, records[file_shard(f)]) for f in readable if file_shard(f) in records and f not in damaged]
        for found, unreadable in parallel_map(store, lambda item: index_damage(store, *item), recorded):
            damage += found
            unseen += [unreadable] if unreadable else []
        if verify:  # what the cheap checks cannot see: a page changed in place
            damaged = {d.path for d in damage + unseen}
            pages = parallel_map(store, lambda f: page_problem(store, f), [f for f in readable if f not in damaged])
            unseen += [Damage(f, reason, file_shard(f)) for f, reason in
                       zip([f for f in readable if f not in damaged], pages) if reason]
    for layer, values in merge_records(records.values()).items():
        if layer in layers:
            layers[layer]["values"] = values  # computed by the actors as they wrote
    bad = [b.to_dict() for b in sorted_bad(r.bad for r in records.values())]
    planned = len(manifest.plan) if manifest else None
    done = len(set(records) - {d.shard for d in damage + unseen})
    lines = [str(d) for d in damage] + [mend_by_redo(d) for d in unseen]
    notes = [f"{partition_dir(layer)} is no layer of this dump (not in its manifest): not checked, and left "
             "alone by reruns" for layer in stray]
    notes += [f"{path} is none of the dump's files: actmap's readers pass over it, but a reader of the layer "
              "folder's Parquet files (pyarrow's dataset, Spark) would take it in; move it out"
              for layer in layer_ids for path in _foreign_files(store, layer)]
    return DumpInfo(location, manifest, layers, done, planned, bad, lines, running, notes)
