"""The manifest, and what a run may do with the output folder it is given.

``OUT/_actmap/manifest.json`` is written once when a run starts; each finished shard adds
``OUT/_actmap/shards/<id>.json`` after its files are committed, so a run that stops at any point
can be resumed by the same command. The folder starts with ``_``, which Parquet readers skip.

A dump owns only what it writes (:func:`pipeline._layout.is_owned`): its own folder, and in
each layer's folder its data files and their temporary files. A folder that holds anything
else (hidden entries too) and no manifest is refused before the first run; next to a dump,
other files are left alone, by a resume and by ``--overwrite`` alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Collection, Mapping
from typing import Any

from ._integrity import Damage, check_dump
from ._layout import (LOCK_PATH, MANIFEST_FORMAT, MANIFEST_FORMAT_POOLED_LAST, MANIFEST_FORMATS, MANIFEST_PATH,
                      META_DIR, SHARDS_DIR, SOURCE_INDEX_PATH, file_shard, is_data_file, is_owned, is_temporary,
                      partition_layer, record_shard, shard_record_path, temporary_target)
from ._model_inputs import ModelInput
from ._records import CHANNELS_LAST, LayerSpec, Manifest, ShardRecord
from ._secrets import cannot_use, redact, shown
from ._shards import ShardPlan
from ._sources._base import describe_error
from ._sources._index import Index, IndexFile, first_difference
from ._store import OutputStore
from .config import Config, Reduction, RunSpec, comparable_identity, identity_diff
from .errors import DamagedDumpError, OutputConflictError

log = logging.getLogger(__name__)

_OUTPUT = RunSpec.key("output")


def new_manifest(config: Config, model: Mapping, source: Mapping, num_samples: int,
                 layer_info: Mapping[str, LayerSpec] | None = None, inputs: ModelInput | None = None,
                 labels: Mapping[str, Any] | None = None) -> Manifest:
    """The manifest of a run (a pure function of its inputs, but for the timestamp), without the
    credentials its URIs may carry (:func:`pipeline._secrets.redact`). Its format is
    ``MANIFEST_FORMAT_POOLED_LAST`` where a layer's maps are pooled as channels-last (which an
    earlier version would resume pooling otherwise), else ``MANIFEST_FORMAT``."""
    pooled_last = config.dump.reduce in (Reduction.POOL, Reduction.CHANNEL_MEAN) and any(
        spec.layout == CHANNELS_LAST for spec in (layer_info or {}).values())
    return Manifest(format=MANIFEST_FORMAT_POOLED_LAST if pooled_last else MANIFEST_FORMAT,
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    identity=redact(config.identity()), config=redact(config.to_dict()), model=model,
                    source=redact(source),
                    plan=ShardPlan(num_samples, config.run.shard_size), layers=config.model.layers,
                    layer_info=layer_info or {}, input=inputs, labels=labels)


def read_manifest(store: OutputStore) -> Manifest | None:
    """The dump's manifest (``None`` when there is none); :class:`DamagedDumpError`, naming the
    file and what to do, when it cannot be read."""
    if not store.exists(MANIFEST_PATH):
        return None
    try:
        return Manifest.from_dict(store.read_json(MANIFEST_PATH))
    except (FileNotFoundError, IsADirectoryError, ValueError) as exc:  # a RecordError is a ValueError
        raise DamagedDumpError(f"{store.path(MANIFEST_PATH)} cannot be read ({describe_error(exc)}): without it "
                               "the dump cannot be resumed or checked. Rerun with --overwrite to replace the "
                               "dump (only the files actmap wrote are deleted), or choose another folder") from None
    except OSError as exc:  # storage that does not answer, or refuses: the dump is not the worse for it
        raise OSError(f"{store.path(MANIFEST_PATH)} cannot be read now ({describe_error(exc)}); the dump is left "
                      "as it is: rerun when its storage answers") from exc


#: Keys a later version added to a source's identity: a dump begun before one resumes without
#: it (as it would have: the fact was not looked at then).
_ADDED_SOURCE_KEYS = frozenset({"schemas_sha256"})
#: The key of a source's identity that holds, for some of its keys, the value an earlier version
#: gave the same source (a path as spelled, where this one keeps one spelling): a dump begun then
#: holds that value, and resumes.
_EARLIER = "earlier"


def conflicts(existing: Manifest, new: Manifest) -> list[str]:
    """Why a run described by ``new`` may not resume the dump ``existing`` (empty: it may).

    >>> from pipeline.config import Config
    >>> a = new_manifest(Config(), {"weights_sha256": "x"}, {"count": 1}, 10)
    >>> b = new_manifest(Config.from_dict({"dump": {"dtype": "float32"}}), {"weights_sha256": "x"}, {"count": 1}, 10)
    >>> conflicts(a, b)
    ['config: dump.dtype: "float16" -> "float32"']
    """
    if existing.format not in MANIFEST_FORMATS:
        return [f"manifest format {existing.format!r}, this version writes {' or '.join(map(repr, MANIFEST_FORMATS))}"]
    # (a dump made before credentials were left out of manifests holds them: compared without)
    old_identity, new_identity = comparable_identity(redact(existing.identity)), comparable_identity(new.identity)
    lines = [f"config: {line}" for line in identity_diff(old_identity, new_identity)]
    lines += [f"model: {line}" for line in identity_diff(existing.model, new.model)]
    old_source = {k: v for k, v in redact(existing.source).items() if k != _EARLIER}
    new_source = {k: v for k, v in new.source.items() if k in old_source or k not in _ADDED_SOURCE_KEYS}
    for key, value in new_source.pop(_EARLIER, {}).items():
        if old_source.get(key) == value:
            new_source[key] = value
    lines += [f"source: {line}" for line in identity_diff(old_source, new_source)]
    if lines:  # (a layer's shape or dtype that a difference above changed says nothing more)
        return lines
    # the model, built as it is now, may give its layers in other shapes or layouts than when
    # the dump began (a dump of variable shapes, or of an older version, does not say them all)
    pooled = Config.from_dict(new.config).dump.reduce in (Reduction.POOL, Reduction.CHANNEL_MEAN)
    return [f"layers: {layer}: {existing.layer_info[layer].describe()}{unknown} -> {spec.describe()}"
            for layer, spec in new.layer_info.items() if layer in existing.layer_info
            for unknown in [_stored_otherwise(existing.layer_info[layer], spec, pooled)] if unknown is not None]


def _stored_otherwise(old: LayerSpec, new: LayerSpec, pooled: bool) -> str | None:
    """Whether a layer that ``old`` describes is stored otherwise by a run that says ``new``,
    as far as both say: ``None`` if not, else what to add to ``old``'s description. Maps a
    run now pools as channels-last, in a dump begun before layouts were recorded, may have
    been pooled otherwise (as channels-first, unless timm said NHWC)."""
    if old.shape is not None and new.shape is not None and (old.shape, old.dtype) != (new.shape, new.dtype):
        return ""
    if old.layout is not None and new.layout is not None and old.layout != new.layout:
        return ""
    if old.layout is None and new.layout == CHANNELS_LAST and pooled:
        return " (of maps whose layout an earlier version of actmap did not record)"
    return None


# -- the folder ----------------------------------------------------------------------------------


def _owned_layer(entry: str, layers: Collection[str] | None) -> bool:
    layer = partition_layer(entry)
    return layer is not None and (layers is None or layer in layers)


def foreign_entries(store: OutputStore, layers: Collection[str] | None = None) -> list[str]:
    """What the output folder holds that a dump of ``layers`` (``None``: of any layers) does not
    write: names in the folder (hidden ones too), and files in the layers' folders."""
    foreign = []
    for entry in store.entries():
        if entry == META_DIR:
            continue
        if not _owned_layer(entry, layers):
            foreign.append(entry)
        else:
            foreign += [f for f in store.list_files(entry) if not is_owned(f)]
    return foreign


def open_output(location: str) -> OutputStore:
    """The output store at ``location``, refused (:class:`OutputConflictError`, nothing touched)
    when it cannot be a dump's folder: see :func:`check_output_folder`, and a location that
    cannot be opened at all."""
    try:
        store = OutputStore(location)
    except (OSError, ValueError) as exc:  # an unknown scheme, a filesystem that does not load
        raise OutputConflictError(_OUTPUT, cannot_use(location, exc)) from None
    if store.fs.type_name == "mock":
        raise OutputConflictError(_OUTPUT, f"{shown(location)!r} is pyarrow's in-memory filesystem of one process: "
                                  "the dump would be gone when the run ends (and the workers would not see it); "
                                  "give a folder or the URI of storage that keeps it (s3://, gs://, file://)")
    check_output_folder(store)
    return store


def check_output_folder(store: OutputStore) -> None:
    """Refuse, touching nothing, an output that is a file (or under one), that cannot be listed,
    or a folder that holds no dump but holds anything else (hidden entries too)."""
    try:
        store.entries()
    except NotADirectoryError as exc:
        raise OutputConflictError(_OUTPUT, f"{exc}; give a folder: a new one, an empty one, or one that "
                                  "holds a dump of this run") from None
    except OSError as exc:
        raise OutputConflictError(_OUTPUT, f"cannot list {store.location!r}: {describe_error(exc)}") from None
    if not store.exists(MANIFEST_PATH) and (foreign := foreign_entries(store)):
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputConflictError(_OUTPUT, f"{store.location!r} holds files that are not an actmap dump "
                                  f"({shown}); choose an empty or new folder")


def remove_dump(store: OutputStore, layers: Collection[str] | None) -> None:
    """Delete what a dump of ``layers`` (``None``: of any layers) wrote, and nothing else: its
    data and temporary files, its own folder (but the run's lock), the layer folders left
    empty."""
    for entry in store.entries():
        if not _owned_layer(entry, layers):
            continue
        files = store.list_files(entry)
        for f in filter(is_owned, files):
            store.delete_file(store.path(f))
        if all(map(is_owned, files)):
            store.delete_dir(entry)
    for f in store.list_files(META_DIR):
        if f != LOCK_PATH and temporary_target(f) != LOCK_PATH:
            store.delete_file(store.path(f))
    store.delete_dir(SHARDS_DIR)


def remove_temporaries(store: OutputStore, layers: Collection[str], keep: Collection[int] = ()) -> int:
    """Delete the temporary files of writes that never finished (a worker that died, a run cut
    short), but those of the shards in ``keep`` (a worker may still be writing them); how many.
    Only a run that holds the folder's lock may: others' writes are in flight."""
    def kept(target: str) -> bool:
        shard = file_shard(target) if is_data_file(target) else record_shard(target)
        return shard is not None and shard in keep

    folders = [e for e in store.entries() if _owned_layer(e, layers)] + [META_DIR]
    leftovers = [f for folder in folders for f in store.list_files(folder)
                 if is_temporary(f) and is_owned(f) and temporary_target(f) != LOCK_PATH
                 and not kept(temporary_target(f))]
    for f in leftovers:
        store.delete_file(store.path(f))
    return len(leftovers)


@dataclasses.dataclass
class OutputState:
    """What :func:`assess_output` found: whether the run ``resume`` s a dump, the shards
    ``done``, the ``damage`` whose shards are redone, the old dump to remove first
    (``remove``: its layers, ``None`` for any; ``False``: none), and the label types the dump
    resumed began with (:attr:`Manifest.labels`)."""

    resume: bool
    done: dict[int, ShardRecord] = dataclasses.field(default_factory=dict)
    damage: list[Damage] = dataclasses.field(default_factory=list)
    remove: Collection[str] | None | bool = False
    labels: Mapping[str, Any] | None = None
    existing: Manifest | None = None  # (the resumed dump's)


def _source_difference(store: OutputStore, index: Index | None) -> list[str]:
    """Where the source's index ``index`` first differs from the one the dump kept, as a line
    of differences (none when either is missing)."""
    if index is None or not store.exists(SOURCE_INDEX_PATH):
        return []
    try:
        kept = IndexFile(store.fs, store.path(SOURCE_INDEX_PATH))
    except Exception:  # damaged: the identity's lines say enough
        log.debug("the dump's source index cannot be read", exc_info=True)
        return []
    try:
        where = first_difference(kept, index)
    except Exception:  # a kept index that does not read as one: the identity's lines say enough
        log.debug("the dump's source index cannot be compared", exc_info=True)
        where = None
    finally:
        kept.close()
    return [f"source: the first difference, {where}"] if where else []


def _types_changed(store: OutputStore, existing: Manifest, new: Manifest, index: Index | None) -> list[str]:
    """For a dump begun before its source's identity kept a fact of :data:`_ADDED_SOURCE_KEYS`
    (the other Parquet files' schemas): whether the column types its index kept (``fields``)
    differ from the source's now, as a line of differences (a resume would read the rows it
    redoes with the old types)."""
    if index is None or not any(k in new.source and k not in existing.source for k in _ADDED_SOURCE_KEYS):
        return []
    try:
        kept = IndexFile(store.fs, store.path(SOURCE_INDEX_PATH))
    except Exception:  # none, or damaged: the identity's lines have said what they could
        return []
    try:
        before = kept.meta.get("fields")
    finally:
        kept.close()
    if before is None or before == index.meta.get("fields"):
        return []
    return ["source: the columns' types (the fields of the index the dump began with differ from the files' now)"]


def assess_output(store: OutputStore, manifest: Manifest, overwrite: bool = False,
                  source_index: Index | None = None) -> OutputState:
    """What the run of ``manifest`` will do with the output folder, reading only.

    An empty or missing folder is new. A folder with a matching manifest is resumed: the shards
    whose records and files pass the check are done, the others redone (or all are, with
    ``overwrite``). A folder with another run's manifest, an unreadable manifest, or the files
    of a dump without a manifest is refused with :class:`OutputConflictError` unless
    ``overwrite``; one with files that are not a dump, always. A source that changed is named
    where its index (``source_index``, the one kept in the dump) first differs.
    """
    check_output_folder(store)
    try:
        existing = read_manifest(store)
    except DamagedDumpError as exc:
        if not overwrite:
            raise OutputConflictError(_OUTPUT, str(exc)) from None
        log.warning("%s; --overwrite replaces the dump", exc)
        return OutputState(False, remove=None)
    if existing is None:
        leftovers = [f for f in store.list_files(META_DIR) if f != LOCK_PATH and not is_temporary(f)]
        leftovers += [e for e in store.entries() if partition_layer(e) is not None]
        if leftovers and not overwrite:
            raise OutputConflictError(_OUTPUT, f"{store.location!r} holds the files of an actmap dump without "
                                      f"its manifest ({', '.join(leftovers[:5])}): it cannot be resumed; rerun with "
                                      "--overwrite to replace it, or choose another folder")
        return OutputState(False, remove=None if leftovers else False)
    if overwrite:
        return OutputState(False, remove=existing.layers)
    diff = conflicts(existing, manifest) or _types_changed(store, existing, manifest, source_index)
    if diff and "sample_ids" in manifest.source and "sample_ids" not in existing.source:
        raise OutputConflictError(_OUTPUT, f"{store.location!r} holds a dump begun by an earlier version of actmap, "
                                  f"which wrote the ids of {manifest.source.get('id_column')!r} (stored as binary) "
                                  "as Python literals, b'k0' where this version writes k0: resumed, the dump would "
                                  "hold both. Finish it with the version that began it, or rerun with --overwrite "
                                  "to dump it anew, or choose another folder")
    if diff and all(line.startswith("source: ") for line in diff):
        where = _source_difference(store, source_index)
        raise OutputConflictError(_OUTPUT, f"{store.location!r} holds a dump of this config over its source as it "
                                  "was when the dump began, and the source has changed since; rerun with "
                                  "--overwrite to dump the source as it is now, or choose another folder. "
                                  "Differences:\n  " + "\n  ".join(diff + where))
    if diff and all(line.startswith("layers: ") for line in diff):
        raise OutputConflictError(_OUTPUT, f"{store.location!r} holds a dump of this config, but the model as it is "
                                  "built now gives its layers in other shapes (its code, the input size it takes, or how "
                                  "actmap reduces them changed since the dump began): resumed, its files would disagree. Finish it with "
                                  "what began it, or rerun with --overwrite to dump it anew, or choose another "
                                  "folder. Differences:\n  " + "\n  ".join(diff))
    if diff:
        raise OutputConflictError(_OUTPUT, f"{store.location!r} holds a dump of another run; rerun with "
                                  "--overwrite to replace it, or choose another folder. Differences:\n  "
                                  + "\n  ".join(diff))
    checked = check_dump(store, existing.plan, existing.layers, layer_info=existing.layer_info)
    return OutputState(True, checked.records, checked.damage, labels=existing.labels, existing=existing)


def commit_output(store: OutputStore, manifest: Manifest, state: OutputState) -> None:
    """Make the folder ready as :func:`assess_output` found it must be: remove the old dump,
    write the manifest, drop the records of damaged shards, clear the temporary files of writes
    cut short."""
    if state.remove is not False:
        log.info("replacing the dump in %s", store.location)
        remove_dump(store, state.remove)
    if not state.resume:
        store.write_json(MANIFEST_PATH, manifest.to_dict())
        return
    if state.existing is not None and state.existing.format != manifest.format == MANIFEST_FORMAT_POOLED_LAST:
        # begun by a version that recorded layouts but wrote the first format: a version before
        # those would resume it next, pooling the rest otherwise
        store.write_json(MANIFEST_PATH, dataclasses.replace(state.existing, format=manifest.format).to_dict())
    for shard in sorted({d.shard for d in state.damage if d.shard is not None}):
        reasons = "; ".join(str(d) for d in state.damage if d.shard == shard)
        log.warning("shard %d is redone: %s", shard, reasons)
        store.delete_file(store.path(shard_record_path(shard)))
    for damage in state.damage:
        if damage.shard is None and is_data_file(damage.path) and is_owned(damage.path):
            # a data file of a shard the plan has not: named as the dump's own, and no run of it writes it
            log.warning("%s: no shard of this dump writes it; deleted", damage)
            store.delete_file(store.path(damage.path))
        elif damage.shard is None:
            log.warning("%s: no shard of this dump writes it, so the readers refuse the dump while it is "
                        "there; delete it", damage)
    remove_temporaries(store, manifest.layers)
    log.info("resuming the dump in %s: %d of %d shards already done", store.location, len(state.done),
             len(manifest.plan))


def prepare_output(store: OutputStore, manifest: Manifest, overwrite: bool = False) -> dict[int, ShardRecord]:
    """:func:`assess_output`, then :func:`commit_output`; returns the records of the shards done."""
    state = assess_output(store, manifest, overwrite)
    commit_output(store, manifest, state)
    return state.done


def completed_shards(store: OutputStore) -> dict[int, ShardRecord]:
    """The records of the shards whose files are all in place as recorded, by shard id."""
    manifest = read_manifest(store)
    layers = manifest.layers if manifest else sorted({layer for layer in map(partition_layer, store.entries())
                                                       if layer is not None})
    return check_dump(store, manifest.plan if manifest else None, layers,
                      layer_info=manifest.layer_info if manifest else None).records
