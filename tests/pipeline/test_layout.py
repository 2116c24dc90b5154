"""The on-disk contract's names and path rules, and that the code spells them in one place."""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import _layout as layout
from pipeline._store import OutputStore
from pipeline._writer import build_table
from pipeline.errors import ConfigError, ReservedColumnError

PIPELINE = Path(layout.__file__).parent


@pytest.mark.parametrize("layer", ["layer3", "backbone.body.layer3", "a/b c", "x=y", "weird%name", ""])
def test_partition_folder_names_round_trip(layer):
    folder = layout.partition_dir(layer)
    assert folder.startswith("layer=") and "/" not in folder
    assert layout.partition_layer(folder) == layer
    assert layout.layer_file(layer, 3) == f"{folder}/part-00003.parquet"


def test_other_entries_are_no_partition():
    assert [layout.partition_layer(e) for e in ("_actmap", "layers", ".layer=x", "notes.txt")] == [None] * 4
    assert layout.partition_dir("a/b c") == "layer=a%2Fb%20c"


def test_temporary_names_are_hidden_unique_and_recognised(tmp_path):
    final = layout.layer_file("conv1", 0)
    names = {layout.temporary_name(final) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.startswith("layer=conv1/.part-00000.parquet.")
        assert layout.is_temporary(name) and layout.is_hidden(name) and not layout.is_data_file(name)
    assert not layout.is_temporary(final) and layout.is_data_file(final)
    assert not layout.is_temporary("layer=conv1/notes.tmp")  # not hidden: never written by a dump
    store = OutputStore(str(tmp_path))
    assert store.temporary(final).startswith(store.path("layer=conv1/.part-00000.parquet."))


def test_records_live_in_the_runs_folder():
    assert layout.shard_record_path(12) == "_actmap/shards/00012.json"
    assert layout.is_shard_record(layout.shard_record_path(12))
    assert not layout.is_shard_record("_actmap/manifest.json")
    assert not layout.is_shard_record("_actmap/shards/.00012.json.0123.tmp")
    assert layout.MANIFEST_PATH == "_actmap/manifest.json"


def _table(labels, fixed=True):
    rows = len(next(iter(labels.values())))
    fields = [pa.field(k, pa.array(v).type) for k, v in labels.items() if not isinstance(v[0], np.ndarray)]
    return build_table(np.zeros((rows, 2), np.float16), sample_ids=[str(i) for i in range(rows)],
                       indices=list(range(rows)), labels=labels, label_fields=fields, fixed=fixed)


@pytest.mark.parametrize("name", sorted(layout.RESERVED_COLUMNS))
def test_table_builder_refuses_a_label_named_like_an_output_column(name):
    with pytest.raises(ReservedColumnError) as info:
        _table({"label": [1, 2], name: [5, 6]})
    assert isinstance(info.value, ConfigError) and info.value.key == "source"
    # (the other pass-through columns, here 'label', are not named among the output columns)
    assert (f"the pass-through column {name!r} clashes with an output column "
            f"({', '.join(sorted(layout.RESERVED_COLUMNS))});") in str(info.value)


def test_table_builder_refuses_a_label_named_like_a_shape_column():
    labels = {"mask": [np.zeros((2, 2), np.uint8), np.ones((3, 2), np.uint8)], "mask_shape": [1, 2]}
    with pytest.raises(ReservedColumnError, match="'mask_shape' clashes"):
        _table(labels, fixed=False)


# The contract's literals, as code would spell them; each must appear in _layout.py only.
LITERALS = ['"layer="', '"_shape"', '"_actmap', '.tmp"', 'b"actmap"', '"activation"', '"sample_id"',
            '"actmap.tensor/', '"actmap.manifest/', '"part-', '.parquet"']


def test_the_contract_is_spelled_in_one_place():
    found = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        text = path.read_text()
        for literal in LITERALS:
            if literal in text:
                found.setdefault(literal, []).append(path.name)
    assert {k: v for k, v in found.items() if v != ["_layout.py"]} == {}
    assert not re.search(r"f\"\{\w+\}_shape\"", "".join(p.read_text() for p in PIPELINE.rglob("*.py")))
