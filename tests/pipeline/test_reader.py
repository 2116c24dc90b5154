"""Reading a dump back, with actmap and without it."""

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import ActivationDataset, decode_column, inspect_dump, read_layer, read_table, run, to_ray_dataset
from pipeline._reader import dump_layers
from pipeline.config import Config
from pipeline.errors import DamagedDumpError, UnknownDumpLayerError

#: A dump of actmap 0.1.0 whose rows each have their own shape (bfloat16).
VARIABLE = str(Path(__file__).resolve().parent / "fixtures" / "dump-0.1.0" / "variable")


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """A finished dump of 30 generated samples, two layers, made without Ray."""
    out = tmp_path_factory.mktemp("dump") / "out"
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1", "conv2"]},
                               "source": {"count": 30, "image_size": 16},
                               "run": {"output": str(out), "batch_size": 4, "shard_size": 8, "executor": "local"}})
    run(config, stream=None)
    return str(out)


def test_read_layer_whole_and_slices(dump):
    full = read_layer(dump, "conv2")
    assert full.shape == (30, 16, 8, 8) and full.dtype == np.float16
    assert np.array_equal(read_layer(dump, "conv2", start=5, stop=19), full[5:19])
    tensor = read_layer(dump, "conv2", start=28, as_torch=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 16, 8, 8)


def test_read_table_has_ids_labels_and_masks(dump):
    table = read_table(dump, "relu1", stop=3)
    assert table.column("sample_id").to_pylist() == ["0", "1", "2"]
    assert set(table.column_names) >= {"index", "activation", "label", "mask"}


def test_read_table_names_an_unknown_column_and_refuses_a_start_that_is_no_int(dump):
    with pytest.raises(ValueError, match=r"layer 'relu1' of '.*' has no column 'nope'; valid: 'sample_id', 'index', "
                                         r"'activation', 'label', 'mask'$"):
        read_table(dump, "relu1", columns=["index", "nope"])
    with pytest.raises(ValueError, match="has no column 'lable'; did you mean 'label'"):
        read_table(dump, "relu1", columns=["lable"])
    with pytest.raises(TypeError, match="columns must be a list of column names, got 'label'"):
        read_table(dump, "relu1", columns="label")
    with pytest.raises(TypeError, match="start must be an int \\(a source index\\) or None, got '3'"):
        read_table(dump, "relu1", start="3")
    with pytest.raises(TypeError, match="stop must be an int"):
        read_layer(dump, "relu1", stop=2.5)
    assert read_table(dump, "relu1", start=np.int64(28), columns=["index"]).column("index").to_pylist() == [28, 29]


@pytest.mark.parametrize("indices", [5, "12", [1.5], [[1, 2]], [True], {"a": 1}])
def test_read_table_refuses_indices_that_are_not_ints(dump, indices):
    with pytest.raises(TypeError, match=r"indices must be a list of ints \(source indices\), a 1-d integer array "
                                        r"or None, got " + re.escape(repr(indices))):
        read_table(dump, "relu1", indices=indices)


@pytest.mark.parametrize("indices", [[4, 1], np.array([4, 1], np.int32), torch.tensor([4, 1]), range(1, 5, 3), [],
                                     pa.array([4, 1]), pa.chunked_array([[4], [1]])])
def test_read_table_takes_indices_as_a_list_an_array_or_a_tensor(dump, indices):
    got = read_table(dump, "relu1", indices=indices, columns=["index"]).column("index").to_pylist()
    assert got == sorted(i.as_py() if isinstance(i, pa.Scalar) else int(i) for i in indices)
    with pytest.raises(ValueError, match="indices hold 18446744073709551615, beyond any source index"):
        read_table(dump, "relu1", indices=np.array([2**64 - 1], np.uint64))


def test_plain_pyarrow_recipe_without_actmap(dump):
    """The README's recipe: pyarrow, json and numpy only."""
    table = pq.read_table(f"{dump}/layer=conv2").sort_by("index")
    spec = json.loads(table.schema.metadata[b"actmap"])["columns"]["activation"]
    column = table.column("activation").combine_chunks()
    x = np.frombuffer(column.buffers()[1], dtype=spec["dtype"]).reshape(-1, *spec["shape"])
    assert np.array_equal(x, read_layer(dump, "conv2"))
    # the whole dump as one hive-partitioned dataset, one layer at a time
    part = ds.dataset(dump, format="parquet", partitioning="hive").to_table(
        filter=ds.field("layer") == "relu1", columns=["index", "layer"])
    assert part.num_rows == 30


def test_activation_dataset_streams_rows(dump):
    data = ActivationDataset(dump, "conv2")
    assert len(data) == 30
    activation, labels = data[7]
    assert activation.dtype == torch.float32 and activation.shape == (16, 8, 8)
    assert labels["index"] == 7 and labels["sample_id"] == "7"
    assert labels["mask"].shape == (16, 16)
    np.testing.assert_array_equal(activation.numpy(), read_layer(dump, "conv2")[7].astype(np.float32))
    assert torch.equal(data[-1][0], data[29][0])
    with pytest.raises(IndexError):
        data[30]
    loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=2)
    batches = list(loader)
    assert sum(len(b[0]) for b in batches) == 30
    assert batches[0][1]["label"].shape == (8,)
    assert len(data._cache) <= 4


def test_unknown_layer_names_close_matches(dump):
    with pytest.raises(UnknownDumpLayerError, match="holds no rows of layer 'conv3'; did you mean 'conv2'"):
        read_layer(dump, "conv3")


def test_inspect(dump):
    info = inspect_dump(dump)
    assert info.complete and info.shards_done == 4 == info.shards_planned
    assert info.layers["conv2"]["rows"] == 30 and info.layers["conv2"]["shape"] == [16, 8, 8]
    text = info.format()
    assert "shards: 4/4 done, complete" in text
    assert re.search(r"\n  layer conv2: 30 rows of 16x8x8 float16, \d+\.\d MB, 4 files, columns: sample_id, "
                     r"index, activation, label, mask\n", text)


def test_inspect_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dump there"):
        inspect_dump(str(tmp_path))


def test_inspect_of_a_folder_without_a_manifest_says_it_holds_no_dump(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a dump")
    with pytest.raises(FileNotFoundError, match=r"holds no actmap dump \(no _actmap/manifest.json\)"):
        inspect_dump(str(tmp_path))


def test_inspect_of_a_dump_that_lost_its_manifest_says_so(dump, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(dump, out)
    (out / "_actmap" / "manifest.json").unlink()
    with pytest.raises(DamagedDumpError, match=r"holds the files of an actmap dump without its manifest "
                                               r"\(_actmap/shards/00000.json, .*, layer=.*\): they cannot be checked"):
        inspect_dump(str(out))


def test_a_layer_folder_beside_the_dump_is_no_damage(dump, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(dump, out)
    (out / "layer=extra").mkdir()
    shutil.copy(out / "layer=conv2" / "part-00000.parquet", out / "layer=extra" / "part-00000.parquet")
    info = inspect_dump(str(out))
    assert info.complete and not info.damage and info.shards_done == 4 and set(info.layers) == {"relu1", "conv2"}
    assert "note: layer=extra is no layer of this dump (not in its manifest)" in info.format()
    assert np.array_equal(read_layer(str(out), "conv2"), read_layer(dump, "conv2"))
    assert sorted(dump_layers(str(out))) == ["conv2", "relu1"]  # what `actmap show --stats` draws
    with pytest.raises(UnknownDumpLayerError, match="holds no rows of layer 'extra'; valid: 'relu1', 'conv2'"):
        read_layer(str(out), "extra")


def test_a_layer_with_no_finished_shard_is_not_suggested_as_itself(dump, tmp_path):
    out = tmp_path / "out"
    (out / "layer=conv2").mkdir(parents=True)
    shutil.copytree(f"{dump}/_actmap", out / "_actmap", ignore=shutil.ignore_patterns("shards"))
    with pytest.raises(UnknownDumpLayerError, match="holds no rows of layer 'conv2'; none of its shards is "
                       "finished yet") as caught:
        read_layer(str(out), "conv2")
    assert "did you mean" not in str(caught.value)


def test_ray_dataset(dump, ray_cluster):
    rows = to_ray_dataset(dump, "conv2").take_all()
    assert len(rows) == 30
    first = min(rows, key=lambda r: r["index"])
    assert first["activation"].shape == (16, 8, 8)
    np.testing.assert_array_equal(first["activation"], read_layer(dump, "conv2")[0])


def test_activation_dataset_keeps_few_files_open(dump):
    data = ActivationDataset(dump, "relu1", cache_row_groups=2)
    handles = []
    for i in range(len(data)):
        data[i]
        handles += [h for _, h in data._readers.values() if h not in handles]
    assert len(data._readers) <= 2 and len(data._cache) <= 2
    assert len(handles) == 4, "each of the 4 files was opened once, in order"
    still_open = [h for h in handles if not h.closed]
    assert still_open == [h for _, h in data._readers.values()], "a file let go of is closed"
    data.close()
    assert all(h.closed for h in handles) and not data._readers
    assert torch.equal(data[3][0], ActivationDataset(dump, "relu1")[3][0]), "usable after close"


def test_torch_values_are_copied_out_of_read_only_buffers_only():
    from pipeline._reader import _to_array

    frozen = np.arange(6, dtype=np.uint16).reshape(2, 3)
    frozen.flags.writeable = False
    for dtype in ("float16", "bfloat16"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns of a tensor over read-only memory
            tensor = _to_array(frozen.view(np.float16) if dtype == "float16" else frozen, dtype, as_torch=True)
        assert not np.shares_memory(tensor.view(torch.int16).numpy(), frozen)
    mine = np.arange(6, dtype=np.float16)
    assert np.shares_memory(_to_array(mine, "float16", as_torch=True).numpy(), mine)  # no copy needed


def test_activation_dataset_items_are_copies(dump):
    for dtype in (torch.float16, torch.float32, None):
        data = ActivationDataset(dump, "conv2", dtype=dtype)
        before = data[0][0].float().sum()
        data[0][0].mul_(0)
        assert data[0][0].float().sum() == before


def test_a_dump_is_found_by_a_path_object_as_by_its_text(dump):
    from pathlib import Path

    assert np.array_equal(read_layer(Path(dump), "conv2"), read_layer(dump, "conv2"))
    assert len(ActivationDataset(Path(dump), "conv2")) == 30 and inspect_dump(Path(dump)).complete
    with pytest.raises(TypeError, match=r"a dump's location is a path \(str or pathlib.Path\) or a URI, got 12"):
        read_layer(12, "conv2")


@pytest.mark.parametrize("layer", [None, 3, ["conv2"]])
def test_a_layer_that_is_no_name_is_a_type_error_naming_the_layers(dump, layer):
    with pytest.raises(TypeError, match=re.escape(f"layer must be a layer id (a str), got {layer!r}; ") + ".* holds 'relu1', 'conv2'"):
        read_layer(dump, layer)


def test_bounds_beyond_any_index_are_its_ends(dump):
    assert read_table(dump, "conv2", start=2**70).num_rows == 0
    assert read_table(dump, "conv2", start=-2**70, stop=2**70).num_rows == 30


def test_activation_dataset_takes_a_dtype_by_name_and_an_index_of_any_int_type(dump):
    data = ActivationDataset(dump, "conv2", dtype="float16")
    assert data[np.int64(3)][0].dtype == torch.float16 and data[torch.tensor(3)][1]["index"] == 3
    assert ActivationDataset(dump, "conv2", dtype=np.float64)[0][0].dtype == torch.float64
    with pytest.raises(TypeError, match=r"dtype must be a torch dtype \(torch.float16\), its name \('float16'\) or "
                                        r"None \(the stored dtype\), got 'nope'"):
        ActivationDataset(dump, "conv2", dtype="nope")


def test_activation_dataset_refuses_bad_arguments_naming_them(dump):
    data = ActivationDataset(dump, "conv2")
    with pytest.raises(IndexError, match="index -31 out of range for 30 rows"):
        data[-31]
    for index in (slice(1, 3), "0", 1.0):
        with pytest.raises(TypeError, match=re.escape(f"an item's index is an int, got {index!r}; for many rows")):
            data[index]
    for kwargs, error, said in [({"window": 1.5}, TypeError, "window must be an int of at least 1, got 1.5"),
                                ({"shuffle": True, "seed": -1}, ValueError, "seed must be an int of at least 0, got -1"),
                                ({"cache_row_groups": -1}, ValueError, "cache_row_groups must be an int of at least 0")]:
        with pytest.raises(error, match=re.escape(said)):
            ActivationDataset(dump, "conv2", **{"shuffle": True, **kwargs})
    with pytest.raises(TypeError, match="epoch must be an int of at least 0, got 'a'"):
        ActivationDataset(dump, "conv2", shuffle=True).set_epoch("a")
    # what only a shuffled order uses is not looked at without it, as before
    unshuffled = ActivationDataset(dump, "conv2", seed=-1, window=0)
    unshuffled.set_epoch(-1)
    assert torch.equal(unshuffled[3][0], data[3][0])
    assert len(ActivationDataset(dump, "conv2", shuffle=True, cache_row_groups=0)) == 30
    with pytest.raises(ValueError, match="cache_row_groups must be an int of at least 1, got 0"):
        ActivationDataset(dump, "conv2", cache_row_groups=0)  # (its files would be closed as they open)


def test_read_table_with_no_columns_gives_the_rows_alone(dump):
    table = read_table(dump, "relu1", stop=5, columns=[])
    assert table.column_names == [] and table.num_rows == 5


def test_read_table_refuses_a_column_named_twice(dump):
    with pytest.raises(ValueError, match="columns lists 'index' more than once; name each column once"):
        read_table(dump, "relu1", columns=["index", "label", "index"])


def test_read_table_sorts_by_index_when_the_index_is_not_asked_for(dump):
    assert read_table(dump, "relu1", columns=["sample_id"]).column("sample_id").to_pylist() == [str(i) for i in range(30)]


def test_a_variable_shape_column_comes_with_its_shapes(dump):
    table = read_table(VARIABLE, "relu1", columns=["activation"])
    assert table.column_names == ["activation", "activation_shape"]
    assert all(np.array_equal(a, b) for a, b in zip(decode_column(table), read_layer(VARIABLE, "relu1")))


def test_decode_column_names_a_column_it_cannot_decode(dump):
    table = read_table(dump, "relu1", stop=2)
    with pytest.raises(ValueError, match=r"column 'label' holds no tensor \(read its values with "
                                         r"table.column\('label'\)\); the table's tensor columns: 'activation', 'mask'"):
        decode_column(table, "label")
    with pytest.raises(ValueError, match="column 'nope' is not in the table; the table's tensor columns"):
        decode_column(table, "nope")
    with pytest.raises(ValueError, match="the table lacks 'mask', which decoding 'mask' needs"):
        decode_column(table.drop_columns(["mask"]), "mask")
    variable = read_table(VARIABLE, "relu1").drop_columns(["activation_shape"])
    with pytest.raises(ValueError, match="the table lacks 'activation_shape', which decoding 'activation' needs"):
        decode_column(variable)


@pytest.mark.parametrize("dtype", [torch.int8, "int64", np.int32, torch.bool])
def test_activation_dataset_refuses_a_dtype_that_would_truncate_the_activations(dump, dtype):
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype \(torch.float32, torch.float16, "
                                         r"torch.bfloat16, torch.float64\) or None \(the stored dtype\), got torch\."):
        ActivationDataset(dump, "conv2", dtype=dtype)


@pytest.fixture(scope="module")
def variable_dump(tmp_path_factory):
    """Rows of one shape, stored as variable shapes (float32)."""
    out = tmp_path_factory.mktemp("variable") / "out"
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["conv2"]},
                               "source": {"count": 6, "image_size": 16}, "dump": {"dtype": "float32", "shapes": "variable"},
                               "run": {"output": str(out), "batch_size": 4, "shard_size": 4, "executor": "local"}})
    run(config, stream=None)
    return str(out)


def test_ray_dataset_of_variable_shapes_gives_one_array_per_row_in_its_dtype(variable_dump, ray_cluster):
    for where, dtype in ((VARIABLE, np.float32), (variable_dump, np.float32)):  # (bfloat16 widened)
        rows = sorted(to_ray_dataset(where, "conv2").take_all(), key=lambda r: r["index"])
        expected = read_layer(where, "conv2")
        assert len(rows) == len(expected) and len({r["activation"].shape for r in rows}) == (
            len({e.shape for e in expected}))
        for row, values in zip(rows, expected):
            assert row["activation"].dtype == dtype and np.array_equal(row["activation"], values)


def test_a_file_of_another_name_in_a_layer_folder_is_noted_and_passed_over(dump, tmp_path):
    # actmap's readers take the part files alone; a reader of the folder (pyarrow's dataset,
    # the README's recipe without actmap) took the copy's rows too, and inspect said nothing
    out = tmp_path / "out"
    shutil.copytree(dump, out)
    shutil.copy(out / "layer=conv2" / "part-00000.parquet", out / "layer=conv2" / "part-00000 (1).parquet")
    (out / "layer=conv2" / "backup").mkdir()  # (in a folder inside: it was taken for the shard's file, as damage)
    shutil.copy(out / "layer=conv2" / "part-00000.parquet", out / "layer=conv2" / "backup" / "part-00000.parquet")
    (out / "layer=conv2" / ".notes.txt").write_text("hidden: no reader takes it in")
    info = inspect_dump(str(out))
    assert info.complete and not info.damage
    assert [line for line in info.format().splitlines() if "none of the dump's files" in line] == [
        f"note: layer=conv2/{name} is none of the dump's files: actmap's readers pass over it, but a reader of the "
        "layer folder's Parquet files (pyarrow's dataset, Spark) would take it in; move it out"
        for name in ("backup/part-00000.parquet", "part-00000 (1).parquet")]
    assert np.array_equal(read_layer(str(out), "conv2"), read_layer(dump, "conv2"))
