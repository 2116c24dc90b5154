"""Damage that only a file's pages or footer show: `actmap inspect` and the readers name the file.

Each test damages a copy of a small dump in place (a flipped byte, a file put in the wrong
folder, a footer rewritten) and checks that `inspect` (with and without --verify) says which
file and what to do (exit 3), and that the readers refuse the dump rather than give wrong rows.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ActivationDataset, inspect_dump, read_layer, read_table, run
from pipeline._manifest import completed_shards
from pipeline._store import OutputStore
from pipeline.cli import main
from pipeline.config import Config
from pipeline.errors import DamagedDumpError

VARIABLE = Path(__file__).resolve().parent / "fixtures" / "dump-0.1.0" / "variable"


def _config(out) -> Config:
    # float32 without compression: conv1 and relu1 have one shape, so their files one size
    return Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["conv1", "relu1", "conv2"]},
                             "source": {"count": 24, "image_size": 16},
                             "dump": {"dtype": "float32", "compression": "none"},
                             "run": {"output": str(out), "batch_size": 4, "shard_size": 8, "executor": "local"}})


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """A finished dump of 24 generated samples in 3 shards, three layers, made without Ray."""
    out = tmp_path_factory.mktemp("dump") / "out"
    run(_config(out), stream=None)
    return out


@pytest.fixture
def copy(dump, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(dump, out)
    return out


def _inspect(out: Path) -> list[str]:
    """The damage `actmap inspect` finds, with and without --verify (each exits 3)."""
    assert main(["inspect", str(out)]) == 3
    assert main(["inspect", str(out), "--verify"]) == 3
    info = inspect_dump(str(out), verify=True)
    assert not info.complete and info.damage == inspect_dump(str(out)).damage
    return info.damage


def _refused(out: Path, layer: str, said: str) -> None:
    """Every reader refuses the dump, naming the damaged file and what it says."""
    for read in (lambda: read_layer(str(out), layer), lambda: list(ActivationDataset(str(out), layer)),
                 lambda: read_table(str(out), layer, columns=["index"])):
        with pytest.raises(DamagedDumpError, match=said):
            read()


def _flip_byte(path: Path, position: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))


def _rewrite(out: Path, relative: str, table) -> None:
    """Write ``table`` as the file ``relative`` and pin its new size in its shard's record, as a
    writer that meant it would: only what the footer says can tell then."""
    pq.write_table(table, out / relative, compression="none", write_page_checksum=True)
    record_path = out / "_actmap" / "shards" / f"{int(relative[-13:-8]):05d}.json"
    record = json.loads(record_path.read_text())
    layer = next(layer for layer, name in record["files"].items() if name == relative)
    record["bytes"][layer] = (out / relative).stat().st_size
    record_path.write_text(json.dumps(record))


def _with_metadata(table, **changes):
    doc = json.loads(table.schema.metadata[b"actmap"])
    for key, value in changes.items():
        target = doc
        *path, last = key.split("__")
        for part in path:
            target = target[part]
        target[last] = value
    return table.replace_schema_metadata({b"actmap": json.dumps(doc).encode()})


def test_a_damaged_index_page_is_named_by_inspect_with_what_to_do(copy, capsys):
    name = "layer=conv2/part-00001.parquet"
    meta = pq.ParquetFile(copy / name).metadata.row_group(0)
    index = next(meta.column(j) for j in range(meta.num_columns) if meta.column(j).path_in_schema == "index")
    _flip_byte(copy / name, index.data_page_offset + index.total_compressed_size - 3)  # an index value
    damage = _inspect(copy)
    assert len(damage) == 1 and damage[0].startswith(f"{name}: a page does not read back as written (")
    assert damage[0].endswith("delete its shard's record (_actmap/shards/00001.json) and rerun the same command "
                              "to redo the shard")
    assert name in capsys.readouterr().out
    _refused(copy, "conv2", f"{name}: a page does not read back")


def test_a_file_of_another_layer_put_in_a_layers_folder_is_damage(copy):
    """Same size, rows and indices as the file it replaces: only its footer says which layer it holds."""
    shutil.copyfile(copy / "layer=conv1/part-00001.parquet", copy / "layer=relu1/part-00001.parquet")
    said = ("layer=relu1/part-00001.parquet: its footer says it holds rows of layer 'conv1', not of 'relu1', "
            "whose folder it is in")
    assert [line.startswith(said) for line in _inspect(copy)] == [True]
    _refused(copy, "relu1", said)
    assert sorted(completed_shards(OutputStore(str(copy)))) == [0, 2]  # what a rerun keeps: it redoes shard 1
    run(_config(copy), stream=None)
    assert inspect_dump(str(copy)).complete and read_layer(str(copy), "relu1").min() >= 0


def test_a_flipped_byte_in_the_footers_shape_is_damage(copy):
    """The key-value copy of the metadata differs from the one in the Arrow schema (pyarrow keeps both)."""
    name = "layer=conv2/part-00000.parquet"
    data = (copy / name).read_bytes()
    at = data.rindex(b'"shape": [16, 8, 8]') + len(b'"shape": [1')
    _flip_byte(copy / name, at, ord("6") ^ ord("2"))  # [16, 8, 8] -> [12, 8, 8]
    said = f"{name}: its footer is damaged: its two copies of the 'actmap' metadata differ"
    assert _inspect(copy) == [said]
    _refused(copy, "conv2", said)


@pytest.mark.parametrize("old, new, said", [
    (b'"format"', b'"formax"', "unknown actmap metadata format None"),
    (b'"columns": {', b'"columns"; {', r"the 'actmap' metadata is not JSON \(Expecting ':' delimiter"),
    (b'"dtype": "float32"', b'"dtype": "floax32"', "gives column 'activation' the dtype 'floax32', no numeric dtype"),
])
def test_metadata_that_does_not_parse_is_damage_named_with_its_file(copy, old, new, said):
    name = "layer=relu1/part-00002.parquet"
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data.replace(old, new, 1))
    damage = _inspect(copy)
    assert len(damage) == 1 and damage[0].startswith(f"{name}: its footer is damaged: ")
    _refused(copy, "relu1", f"{name}: its footer is damaged: .*{said}")


def test_a_footer_whose_shape_disagrees_with_the_manifest_is_damage(copy):
    """Rewritten whole (both copies agree, the width fits): the manifest still says what the layer holds."""
    name = "layer=conv2/part-00002.parquet"
    _rewrite(copy, name, _with_metadata(pq.read_table(copy / name), columns__activation__shape=[8, 16, 8]))
    said = f"{name}: its footer says its activations are 8x16x8 float32, the dump's manifest says 16x8x8 float32"
    assert [line.startswith(said) for line in _inspect(copy)] == [True]
    _refused(copy, "conv2", re.escape(said))
    assert sorted(completed_shards(OutputStore(str(copy)))) == [0, 1]  # what a rerun keeps: it redoes shard 2
    run(_config(copy), stream=None)
    assert inspect_dump(str(copy)).complete and read_layer(str(copy), "conv2").shape == (24, 16, 8, 8)


def test_a_footer_whose_shape_does_not_fit_its_column_is_damage(copy):
    name = "layer=conv2/part-00002.parquet"
    _rewrite(copy, name, _with_metadata(pq.read_table(copy / name), columns__activation__shape=[12, 8, 8]))
    said = (f"{name}: its footer is damaged: column 'activation' is fixed_size_binary\\[4096\\], where its "
            r"metadata's 12x8x8 float32 takes fixed_size_binary\[3072\]")
    assert len(damage := _inspect(copy)) == 1 and damage[0] == said.replace("\\", "")
    _refused(copy, "conv2", said)


def test_a_file_whose_columns_differ_from_the_layers_other_files_is_damage(copy):
    name = "layer=relu1/part-00001.parquet"
    table = pq.read_table(copy / name)
    renamed = table.rename_columns(["lacel" if c == "label" else c for c in table.column_names])
    _rewrite(copy, name, renamed.replace_schema_metadata(table.schema.metadata))
    said = (f"{name}: its footer disagrees with the layer's other files: it lacks the column 'label' (int64) that "
            "they have")
    assert _inspect(copy) == [said]
    _refused(copy, "relu1", said.replace("(", r"\(").replace(")", r"\)"))


def test_a_layer_stored_with_another_shape_column_is_damage(tmp_path):
    """One flipped bit renames a variable-shape file's `activation_shape`: read as if it were there,
    its rows would come back flat."""
    out = tmp_path / "variable"
    shutil.copytree(VARIABLE, out)
    name = "layer=relu1/part-00000.parquet"
    data = (out / name).read_bytes()
    _flip_byte(out / name, data.index(b"activation_shape") + len("activation_sh"), 0x04)  # -> activation_shepe
    assert "activation_shepe" in pq.read_schema(out / name).names
    said = (f"{name}: its footer is damaged: it lacks the column 'activation_shape' that holds the shapes of its "
            "variable-shape column 'activation'")
    assert _inspect(out) == [said]
    _refused(out, "relu1", said)


def test_an_undamaged_dump_of_every_kind_passes(dump):
    """No false alarm: this version's dump, and the dumps of 0.1.0 (fixed and variable shapes)."""
    for where in (dump, VARIABLE, VARIABLE.parent / "generated"):
        info = inspect_dump(str(where), verify=True)
        assert info.complete and not info.damage, info.damage
    assert np.asarray(read_layer(str(dump), "relu1")).shape == (24, 8, 16, 16)


def test_a_footer_whose_row_groups_do_not_add_up_to_its_rows_is_damage(copy):
    """A flip in one row group's count (the file's own count intact): the dataset would count rows
    that are not there."""
    name = "layer=conv2/part-00001.parquet"
    original = (copy / name).read_bytes()
    size = len(original) - int.from_bytes(original[-8:-4], "little") - 8  # where the footer starts
    for position in range(size, len(original) - 8):
        data = bytearray(original)
        data[position] ^= 0x02
        (copy / name).write_bytes(bytes(data))
        try:
            meta = pq.ParquetFile(copy / name).metadata
            if meta.num_rows == 8 and meta.row_group(0).num_rows != 4 and meta.metadata == pq.read_metadata(
                    copy / "layer=conv2/part-00000.parquet").metadata:
                break
        except Exception:
            pass
    else:
        pytest.fail("no byte of the footer holds the first row group's rows")
    said = f"{name}: its footer is damaged: its row groups hold {meta.row_group(0).num_rows + 4} rows, it says 8"
    assert _inspect(copy) == [said]
    _refused(copy, "conv2", said)


def test_files_that_split_a_layer_evenly_are_all_named_and_a_rerun_mends_them(copy):
    """No file can be taken for the layer's then: naming one side would have a rerun redo the good
    files and keep the bad, for good."""
    for name, new in (("layer=relu1/part-00000.parquet", "lacel"), ("layer=relu1/part-00001.parquet", "lbl")):
        table = pq.read_table(copy / name)
        renamed = table.rename_columns([new if c == "label" else c for c in table.column_names])
        _rewrite(copy, name, renamed.replace_schema_metadata(table.schema.metadata))
    damage = _inspect(copy)
    assert sorted(line.split(":")[0] for line in damage) == [f"layer=relu1/part-0000{i}.parquet" for i in range(3)]
    assert all("its footer disagrees with the layer's other files" in line for line in damage), damage
    run(_config(copy), stream=None)
    assert inspect_dump(str(copy)).complete
    assert read_table(str(copy), "relu1").column("label").to_pylist() == read_table(str(copy), "conv2").column("label").to_pylist()


def test_two_files_that_disagree_are_both_named(tmp_path):
    out = tmp_path / "out"
    config = Config.from_dict({**_config(out).to_dict(), "source": {"count": 16, "image_size": 16}})
    run(config, stream=None)
    name = "layer=relu1/part-00000.parquet"
    table = pq.read_table(out / name)
    _rewrite(out, name, table.cast(table.schema.set(table.schema.get_field_index("label"),
                                                    pa.field("label", pa.int32()))))
    damage = _inspect(out)
    assert sorted(line.split(":")[0] for line in damage) == [f"layer=relu1/part-0000{i}.parquet" for i in range(2)]
    assert "the layer's files hold its column 'label' in as many ways as each other: this one as int32" in damage[0]
    run(config, stream=None)
    assert inspect_dump(str(out)).complete
