"""The manifest: what a dump is (config, model, source, shard plan) and which shards are done.

``OUT/_actmap/manifest.json`` is written once when a run starts; each finished shard adds
``OUT/_actmap/shards/<id>.json`` after its files are committed, so a run that stops at any point
can be resumed by the same command. The folder starts with ``_``, which Parquet readers skip.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

from ._layout import MANIFEST_FORMAT, MANIFEST_PATH, SHARDS_DIR, is_hidden, is_shard_record, is_temporary
from ._records import ShardRecord
from ._store import OutputStore
from .config import Config, comparable_identity, identity_diff
from .errors import OutputConflictError

log = logging.getLogger(__name__)


def new_manifest(config: Config, model: Mapping, source: Mapping, num_samples: int) -> dict:
    """The manifest document of a run (a pure function of its inputs, but for the timestamp)."""
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "identity": config.identity(),
        "config": config.to_dict(),
        "model": dict(model),
        "source": dict(source),
        "plan": {"samples": num_samples, "shard_size": config.run.shard_size,
                 "shards": -(-num_samples // config.run.shard_size)},
        "layers": list(config.model.layers),
    }


def conflicts(existing: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Why a run described by ``new`` may not resume the dump ``existing`` (empty: it may).

    >>> from pipeline.config import Config
    >>> a = new_manifest(Config(), {"weights_sha256": "x"}, {"count": 1}, 10)
    >>> b = new_manifest(Config.from_dict({"dump": {"dtype": "float32"}}), {"weights_sha256": "x"}, {"count": 1}, 10)
    >>> conflicts(a, b)
    ['config: dump.dtype: "float16" -> "float32"']
    """
    if existing.get("format") != MANIFEST_FORMAT:
        return [f"manifest format {existing.get('format')!r}, this version writes {MANIFEST_FORMAT!r}"]
    old_identity, new_identity = comparable_identity(existing["identity"]), comparable_identity(new["identity"])
    lines = [f"config: {line}" for line in identity_diff(old_identity, new_identity)]
    lines += [f"model: {line}" for line in identity_diff(existing["model"], new["model"])]
    lines += [f"source: {line}" for line in identity_diff(existing["source"], new["source"])]
    return lines


def prepare_output(store: OutputStore, manifest: dict, overwrite: bool = False) -> dict[int, ShardRecord]:
    """Make the output folder ready for ``manifest``'s run; return the records of shards done.

    An empty or missing folder gets the manifest. A folder with a matching manifest is resumed
    (or cleared, with ``overwrite``). A folder with another run's manifest, or with files that
    are not a dump, is refused with :class:`OutputConflictError`, and nothing in it is touched.
    """
    entries = [e for e in store.entries() if not is_hidden(e)]
    if entries and not store.exists(MANIFEST_PATH):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputConflictError("run.output", f"{store.location!r} holds files that are not an actmap "
                                  f"dump ({shown}); choose an empty or new folder")
    if entries:
        existing = store.read_json(MANIFEST_PATH)
        if overwrite:
            log.info("overwriting the dump in %s", store.location)
            store.clear()
        else:
            diff = conflicts(existing, manifest)
            if diff:
                raise OutputConflictError("run.output", f"{store.location!r} holds a dump of another "
                                          "run; rerun with --overwrite to replace it, or choose another "
                                          "folder. Differences:\n  " + "\n  ".join(diff))
            done = completed_shards(store)
            for leftover in filter(is_temporary, store.list_files("")):  # writes cut short
                store.delete_file(store.path(leftover))
            log.info("resuming the dump in %s: %d of %d shards already done", store.location,
                     len(done), manifest["plan"]["shards"])
            return done
    store.write_json(MANIFEST_PATH, manifest)
    return {}


def completed_shards(store: OutputStore) -> dict[int, ShardRecord]:
    """The records of the shards whose files are all in place, by shard id."""
    done = {}
    for path in filter(is_shard_record, store.list_files(SHARDS_DIR)):
        record = ShardRecord.from_dict(store.read_json(path))
        if all(store.exists(f) for f in record.files.values()):
            done[record.shard] = record
        else:
            log.warning("shard %s has a record but misses files; it will be redone", record.shard)
    return done
