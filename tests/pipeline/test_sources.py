import datetime
import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline._sources import (BadSample, DatasetSource, FolderSource, GeneratedSource, ParquetSource,
                              Sample, open_source)
from pipeline._images import decode
from pipeline._labels import split_unfit
from pipeline.config import Config, GeneratedSpec, ParquetSpec, SourceKind, SourceSpec
from pipeline.errors import ConfigError
from support.samples import pixels


def _png(color, size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_generated_is_deterministic_and_labelled():
    a, b = GeneratedSource(50, 32, seed=1), GeneratedSource(50, 32, seed=1)
    for s, t in zip(a.read(range(50)), b.read(reversed(range(50)))[::-1]):
        assert s.sample_id == t.sample_id == str(s.index)
        assert torch.equal(pixels(s), pixels(t))
    labels = [s.labels["label"] for s in a.read(range(50))]
    assert set(labels) == {0, 1, 2, 3}
    for s in a.read(range(50)):
        assert (s.labels["mask"].sum() > 0) == (s.labels["label"] > 0)
    assert not torch.equal(pixels(GeneratedSource(2, 32, seed=2).read([0])[0]), pixels(a.read([0])[0]))


def test_folder_classes_ids_and_bad_files(tmp_path):
    for cls, color in (("cat", "red"), ("dog", "blue")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            (tmp_path / cls / f"{i}.png").write_bytes(_png(color))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    source = FolderSource(tmp_path)
    assert len(source) == 4
    samples = source.read(range(4))
    assert [s.sample_id for s in samples] == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert [s.labels for s in samples][2] == {"label": 1, "class_name": "dog"}
    assert [f.name for f in source.label_fields()] == ["label", "class_name"]
    identity = source.identity()
    (tmp_path / "cat" / "2.png").write_bytes(_png("green"))
    assert FolderSource(tmp_path).identity() != identity


def test_hidden_files_and_folders_are_no_samples_and_no_class(tmp_path, caplog):
    # a macOS '._*' copy was a bad sample, and a hidden folder (.ipynb_checkpoints) a class of
    # its own that moved every other class's label
    for cls in ("cat", "dog", ".ipynb_checkpoints"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "0.png").write_bytes(_png("red"))
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (tmp_path / "dog" / ".thumbs").mkdir()
    (tmp_path / "dog" / ".thumbs" / "0.png").write_bytes(_png("blue"))
    source = FolderSource(tmp_path)
    assert [s.sample_id for s in source.stream(0, len(source))] == ["cat/0.png", "dog/0.png"]
    assert source.classes == ["cat", "dog"]
    assert "3 image file(s) under" in caplog.text and "are left out, e.g. '.ipynb_checkpoints/0.png'" in caplog.text
    only_hidden = tmp_path / "only"
    only_hidden.mkdir()
    (only_hidden / ".a.png").write_bytes(_png("red"))
    with pytest.raises(ConfigError, match=r"holds no image files \(looked for .*; 1 hidden one\(s\) left out, "
                                          r"e.g. '.a.png'\)"):
        FolderSource(only_hidden)


def test_an_empty_class_folder_keeps_the_numbers_of_the_classes_after_it(tmp_path, caplog):
    # a val split whose b/ was empty gave c the label 1, where its train split gave 2, without a word
    for split, filled in (("train", "abc"), ("val", "ac")):
        for cls in "abc":
            (tmp_path / split / cls).mkdir(parents=True)
        for cls in filled:
            (tmp_path / split / cls / "0.png").write_bytes(_png("red"))
    train, val = FolderSource(tmp_path / "train"), FolderSource(tmp_path / "val")
    assert train.classes == val.classes == ["a", "b", "c"]
    assert [s.labels for s in val.stream(0, 2)] == [{"label": 0, "class_name": "a"}, {"label": 2, "class_name": "c"}]
    assert "1 class folder(s) hold no image files ('b'): each still takes its label number" in caplog.text


def test_files_beside_the_class_folders_cost_the_labels_and_say_so(tmp_path, caplog):
    # with 1% of the files or more at the top, the labels went without a warning
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(20):
            (tmp_path / cls / f"{i}.png").write_bytes(_png("red"))
    (tmp_path / "preview.png").write_bytes(_png("blue"))
    source = FolderSource(tmp_path)
    assert source.classes == [] and source.label_fields() == []
    assert "1 of the 41 files lie beside the folders, not in one (e.g. 'preview.png')" in caplog.text


def test_every_suffix_of_a_still_image_format_pil_reads_is_taken(tmp_path):
    # .jfif, .jpe and .apng files were left out without a word
    for name, fmt in (("a.jpg", "JPEG"), ("b.jfif", "JPEG"), ("c.JPE", "JPEG"), ("d.png", "PNG"), ("e.apng", "PNG"),
                      ("f.dib", "BMP"), ("g.pnm", "PPM"), ("h.qoi", "QOI")):
        Image.new("RGB", (4, 3), "red").save(tmp_path / name, format=fmt)
    source = FolderSource(tmp_path)
    samples = list(source.stream(0, len(source)))
    assert [s.sample_id for s in samples] == ["a.jpg", "b.jfif", "c.JPE", "d.png", "e.apng", "f.dib", "g.pnm", "h.qoi"]
    assert all(tuple(decode(s.image).shape) == (3, 3, 4) for s in samples)


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="'.*nope' does not exist"):
        FolderSource(tmp_path / "nope")
    with pytest.raises(ConfigError, match="holds no image files"):
        FolderSource(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file, not a folder of images"):
        FolderSource(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="source.path: cannot use 'foo://bar/x': Unrecognized filesystem"):
        FolderSource("foo://bar/x")


def _parquet(tmp_path, struct=False):
    images = [_png((i * 40, 0, 0)) for i in range(5)]
    column = (pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)]) if struct
              else pa.array(images, pa.binary()))
    table = pa.table({"img": column, "key": [f"k{i}" for i in range(5)], "label": [0, 1, 0, 1, 1],
                      "score": pa.array([0.5] * 5, pa.float32())})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=2)
    return tmp_path / "data.parquet"


@pytest.mark.parametrize("struct", [False, True])
def test_parquet_passes_columns_through(tmp_path, struct):
    path = _parquet(tmp_path, struct)
    source = ParquetSource(str(path), image_column="img", id_column="key")
    assert len(source) == 5
    assert [f.name for f in source.label_fields()] == ["label", "score"]
    assert source.label_fields()[1].type == pa.float32()
    samples = source.read([4, 1])
    assert [s.sample_id for s in samples] == ["k4", "k1"]
    assert samples[0].labels == {"label": 1, "score": 0.5}
    assert samples[0].image[:4] == b"\x89PNG"


def test_parquet_errors(tmp_path):
    path = str(_parquet(tmp_path))
    with pytest.raises(ConfigError, match=r"source.image_column: no column 'image' in .*; did you mean 'img'\?"):
        ParquetSource(path)
    with pytest.raises(ConfigError, match="has type string; expected binary"):
        ParquetSource(path, image_column="key")
    with pytest.raises(ConfigError, match="source.columns: no column 'lable'"):
        ParquetSource(path, image_column="img", columns=["lable"])
    with pytest.raises(ConfigError, match="missing.parquet' does not exist"):
        ParquetSource(str(tmp_path / "missing.parquet"))
    with pytest.raises(ConfigError, match="source.path: cannot use 's3://data/a b': Cannot parse URI"):
        ParquetSource("s3://data/a b")


def test_parquet_files_with_other_columns_are_read_together_and_their_conflicts_named(tmp_path, caplog):
    from pipeline._sources import IndexFile, write_index
    from pipeline._store import OutputStore

    png = _png((9, 0, 0))
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "key": pa.array([], pa.int64())}), tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": [png] * 2, "key": [38, 39], "label": [1, 2], "extra": ["x", "y"]}),
                   tmp_path / "t" / "1.parquet")
    pq.write_table(pa.table({"image": [png] * 2, "key": ["39", "s40"], "label": pa.array([3, 4], pa.int8())}),
                   tmp_path / "t" / "2.parquet")
    source = ParquetSource(str(tmp_path / "t"), id_column="key")
    # the columns of every file (the first is empty and has none), each typed by the first file that has it
    assert [(f.name, f.type) for f in source.label_fields()] == [("label", pa.int64()), ("extra", pa.string())]
    samples = list(source.stream(0, 4))
    assert [s.sample_id for s in samples] == ["38", "39", "39", "s40"]
    assert [s.labels for s in samples] == [{"label": 1, "extra": "x"}, {"label": 2, "extra": "y"},
                                           {"label": 3, "extra": None}, {"label": 4, "extra": None}]
    assert "'extra' is missing from 1 of the 2 files" in caplog.text  # the empty file has no say
    assert source.repeated_ids == {"count": 1, "examples": ["39"]}  # an integer id and a text one: one sample id
    # an actor opens it by the driver's index, with the same columns
    store = OutputStore(str(tmp_path / "out"))
    store.make_dirs("_actmap")
    write_index(store.fs, store.path("_actmap/index.parquet"), source.index)
    actor = ParquetSource(str(tmp_path / "t"), id_column="key", index=IndexFile(store.fs, store.path("_actmap/index.parquet")))
    assert actor.label_fields() == source.label_fields() and actor.identity() == source.identity()
    assert [s.labels for s in actor.stream(0, 4)] == [s.labels for s in samples]
    # what cannot be read together is refused before any work, naming the file
    pq.write_table(pa.table({"image": [png], "key": [1], "label": ["one"]}), tmp_path / "t" / "3.parquet")
    with pytest.raises(ConfigError, match=r"the column 'label' is int64 in '1.parquet' but string in '3.parquet'"):
        ParquetSource(str(tmp_path / "t"), id_column="key")
    pq.write_table(pa.table({"image": [png], "label": [1]}), tmp_path / "t" / "3.parquet")
    with pytest.raises(ConfigError, match=r"source.id_column: 1 of the 3 files .* have no column 'key', e.g. '3.parquet'"):
        ParquetSource(str(tmp_path / "t"), id_column="key")
    assert len(ParquetSource(str(tmp_path / "t"), columns=["label"])) == 5


def test_parquet_columns_take_the_widest_type_of_their_files(tmp_path):
    png = _png((9, 9, 9))
    struct = pa.array([{"bytes": png, "path": "x.png"}])
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"image": [png], "n": pa.array([1], pa.int32()), "f": pa.array([0.5], pa.float32()),
                             "cap": ["a"], "when": pa.array([1], pa.timestamp("ms"))}), tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": struct, "n": [2 ** 40], "f": [0.1], "cap": pa.nulls(1),
                             "when": pa.array([2], pa.timestamp("us"))}), tmp_path / "t" / "1.parquet")
    source = ParquetSource(str(tmp_path / "t"))
    assert [(f.name, f.type) for f in source.label_fields()] == [
        ("n", pa.int64()), ("f", pa.float64()), ("cap", pa.string()), ("when", pa.timestamp("us"))]
    samples = list(source.stream(0, 2))
    assert samples[1].labels["n"] == 2 ** 40 and samples[1].labels["f"] == 0.1 and samples[1].image == png
    # integers and floats do not mix (an int64 over 2**53 is no double), nor do text and bytes
    for first, second in ((pa.array([2 ** 60]), pa.array([0.5])), (pa.array(["x"]), pa.array([b"x"]))):
        pq.write_table(pa.table({"image": [png], "m": first}), tmp_path / "t" / "0.parquet")
        pq.write_table(pa.table({"image": [png], "m": second}), tmp_path / "t" / "1.parquet")
        with pytest.raises(ConfigError, match=f"the column 'm' is {first.type} in '0.parquet' but {second.type} in '1.parquet'"):
            ParquetSource(str(tmp_path / "t"))


def test_a_wider_type_that_does_not_hold_every_value_is_named_up_front(tmp_path, caplog):
    # pyarrow makes int64 of int64 and uint64, nanoseconds of seconds: the clash is named when the
    # source is opened, and a value the output cannot hold makes its own sample bad, with why
    png = _png((9, 9, 9))
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"image": [png, png], "n": pa.array([2 ** 64 - 1, 7], pa.uint64()),
                             "ns": pa.array([[2 ** 64 - 1], [7]], pa.list_(pa.uint64())),
                             "when": pa.array([datetime.datetime(2300, 1, 1)] * 2, pa.timestamp("ms"))}),
                   tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": [png], "n": pa.array([1], pa.int64()), "ns": pa.array([[1]], pa.list_(pa.int64())),
                             "when": pa.array([0], pa.timestamp("ns"))}), tmp_path / "t" / "1.parquet")
    source = ParquetSource(str(tmp_path / "t"))
    assert [(f.name, f.type) for f in source.label_fields()] == [
        ("n", pa.int64()), ("ns", pa.list_(pa.int64())), ("when", pa.timestamp("ns"))]
    assert ("the column 'n' is uint64 in '0.parquet' but int64 in '1.parquet': the output holds it as int64, so a "
            "value over 9,223,372,036,854,775,807 makes its sample bad") in caplog.text
    assert "the column 'ns' is list<element: uint64> in '0.parquet' but list<element: int64> in '1.parquet'" in caplog.text
    assert ("the column 'when' is timestamp[ms] in '0.parquet' but timestamp[ns] in '1.parquet': the output holds it "
            "as timestamp[ns], so a time before 1677-09-21 or after 2262-04-11 makes its sample bad") in caplog.text
    good, bad = split_unfit(list(source.stream(0, 3)), source.label_fields())
    assert [s.index for s in good] == [2] and [b.index for b in bad] == [0, 1]
    assert bad[0].reason.startswith("label 'n' holds 18446744073709551615 (type int); its column holds int64")
    assert bad[1].reason.startswith("label 'when' holds datetime.datetime(2300") and bad[1].reason.endswith("timestamp[ns]")
    caplog.clear()  # types that hold each other's values: nothing to say
    pq.write_table(pa.table({"image": [png], "n": pa.array([1], pa.uint32())}), tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": [png], "n": pa.array([1], pa.int64())}), tmp_path / "t" / "1.parquet")
    assert ParquetSource(str(tmp_path / "t")).label_fields()[0].type == pa.int64()
    assert "makes its sample bad" not in caplog.text


def test_parquet_without_rows_or_files_is_refused(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(ConfigError, match="no Parquet file in"):
        ParquetSource(str(tmp_path / "none"))
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    with pytest.raises(ConfigError, match=r"the 1 Parquet file\(s\) in .* hold no rows"):
        ParquetSource(str(tmp_path / "empty.parquet"))


def test_view_columns_are_read_as_their_plain_types(tmp_path):
    # (pyarrow, DuckDB and Polars write view types) an image column of binary_view was refused
    # as not binary, and a string_view label column made a dump its readers could not sort
    (tmp_path / "t").mkdir()
    images = [_png((i, 0, 0)) for i in range(4)]
    pq.write_table(pa.table({"image": pa.array(images[:2], pa.binary_view()),
                             "name": pa.array(["a", "b"], pa.string_view())}), tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": pa.array(images[2:], pa.binary()), "name": ["c", "d"]}), tmp_path / "t" / "1.parquet")
    source = ParquetSource(str(tmp_path / "t"))
    assert [f.type for f in source.label_fields()] == [pa.string()]
    samples = list(source.stream(0, 4))
    assert [s.image for s in samples] == images and [s.labels["name"] for s in samples] == list("abcd")


def test_a_glob_picks_a_splits_files_from_a_folder(tmp_path, s3):
    # (Hugging Face keeps a dataset's splits side by side: data/train-00000-of-00002.parquet)
    # a glob was "does not exist", and the folder mixed the splits
    from support.storage import upload

    folder = tmp_path / "data"
    folder.mkdir()
    for split, count in (("train", 2), ("test", 1)):
        for f in range(count):
            pq.write_table(pa.table({"image": [_png("red")] * 3, "key": [f"{split}-{f}-{i}" for i in range(3)]}),
                           folder / f"{split}-{f:05d}-of-{count:05d}.parquet")
    local = ParquetSource(str(folder / "train-*.parquet"), id_column="key")
    assert [s.sample_id for s in local.stream(0, len(local))] == [f"train-{f}-{i}" for f in range(2) for i in range(3)]
    upload(folder, f"s3://data/hf?{s3}")
    remote = ParquetSource(f"s3://data/hf/test-*.parquet?{s3}", id_column="key")
    assert [s.sample_id for s in remote.stream(0, len(remote))] == ["test-0-0", "test-0-1", "test-0-2"]
    worker = ParquetSource(str(folder / "train-*.parquet"), id_column="key", index=local.index)  # as an actor opens it
    assert [s.sample_id for s in worker.stream(4, 6)] == ["train-1-1", "train-1-2"]
    with pytest.raises(ConfigError, match=r"'.*/val-\*.parquet' matches no file in '.*/data' \(its files: "
                                          r"test-00000-of-00001.parquet, train-00000-of-00002.parquet, "):
        ParquetSource(str(folder / "val-*.parquet"))
    with pytest.raises(ConfigError, match=r"its folder '.*/nope' does not exist"):
        ParquetSource(str(tmp_path / "nope" / "*.parquet"))
    for glob in ("d*/train-00000-of-00002.parquet", "d*/*.parquet"):
        with pytest.raises(ConfigError, match="a glob matches the file names of one folder, not folders: name the"):
            ParquetSource(str(tmp_path / glob))
    # the files a folder's listing leaves out are no data for a glob either: macOS's `._` copies
    (folder / "._train-00000-of-00002.parquet").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (folder / "_train-metadata.parquet").write_bytes(b"not a data file")
    again = ParquetSource(str(folder / "*train-*.parquet"), id_column="key")
    assert {**again.identity(), "path": None} == {**local.identity(), "path": None}  # the same files, rows and index
    with pytest.raises(ConfigError, match="is not a Parquet file that can be read"):
        ParquetSource(str(folder / "._train-*.parquet"))  # named by the pattern itself: taken
    with pytest.raises(ConfigError, match=r"its files whose names start with '\.' or '_' are left out "
                                          r"\('_train-metadata.parquet'\): start the pattern so"):
        ParquetSource(str(folder / "*-metadata.parquet"))
    (folder / "label=0").mkdir()
    with pytest.raises(ConfigError, match=r"it matches folders \('label=0'\), and a glob takes files: name the folder"):
        ParquetSource(str(folder / "label=*"))
    (tmp_path / "data").rename(tmp_path / "d*")  # a folder that is there is a name, not a glob
    assert len(ParquetSource(str(tmp_path / "d*" / "train-*.parquet"))) == 6


def test_a_file_without_rows_may_lack_the_id_column(tmp_path):
    # (an empty partition from an empty frame) the search for repeated ids read its id column
    # anyway, and the run ended on pyarrow's "No match for FieldRef.Name(key)"
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"image": [_png("red")] * 3, "key": ["a", "b", "a"]}), tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "t" / "1.parquet")
    source = ParquetSource(str(tmp_path / "t"), id_column="key")
    assert [s.sample_id for s in source.stream(0, len(source))] == ["a", "b", "a"]
    assert source.repeated_ids == {"count": 1, "examples": ["a"]}


def test_a_column_only_files_without_rows_have_is_named_as_such(tmp_path):
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"image": [b"\x89PNG"], "label": [1]}), tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "score": pa.array([], pa.float64())}),
                   tmp_path / "t" / "1.parquet")
    assert [f.name for f in ParquetSource(str(tmp_path / "t")).label_fields()] == ["label"]  # no say in the columns
    with pytest.raises(ConfigError, match="source.columns: the column 'score' is only in files without rows "
                                          r"\(e.g. '1.parquet'\): it would be null in every row"):
        ParquetSource(str(tmp_path / "t"), columns=["score"])
    with pytest.raises(ConfigError, match="source.columns: no column 'scores'"):
        ParquetSource(str(tmp_path / "t"), columns=["scores"])


def test_dataset_source_items_and_bad_items():
    source = DatasetSource("support.datasets:Squares", {"n": 6, "size": 8, "bad": 3})
    assert len(source) == 6
    samples = source.read(range(6))
    assert isinstance(samples[3], BadSample) and samples[3].reason == "ValueError: item 3 is corrupt"
    assert isinstance(samples[4], Sample) and samples[4].labels == {"label": 1}
    assert [f.name for f in source.label_fields()] == ["label"]
    dicts = DatasetSource("support.datasets:DictItems", {"n": 3})
    item = dicts.read([2])[0]
    assert item.labels["label"] == 2 and item.labels["box"].tolist() == [2, 3, 4, 5]
    assert [f.name for f in dicts.label_fields()] == ["label"]


def test_dataset_source_errors():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        DatasetSource("no_such_module:x")
    with pytest.raises(ConfigError, match="'support.datasets' has no attribute 'Sqaures'; did you mean 'Squares'"):
        DatasetSource("support.datasets:Sqaures")
    with pytest.raises(ConfigError, match=r"failed: TypeError"):
        DatasetSource("support.datasets:Squares", {"colour": 1})
    with pytest.raises(ConfigError, match=r"'support.datasets:Squares'\(\*\*\{'n': 0\}\) has no items \(its len is 0\)"):
        DatasetSource("support.datasets:Squares", {"n": 0})


def test_open_source_dispatches_on_kind(tmp_path):
    assert isinstance(open_source(GeneratedSpec()), GeneratedSource)
    path = str(_parquet(tmp_path))
    assert isinstance(open_source(ParquetSpec(path=path, image_column="img")), ParquetSource)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png("red"))
    from support.webdataset import write_shards

    shards = write_shards(tmp_path / "wds")
    specs = {"generated": {}, "folder": {"path": str(tmp_path / "images")},
             "parquet": {"path": path, "image_column": "img"}, "dataset": {"target": "support.datasets:Squares"},
             "webdataset": {"path": [str(shards / "train-0000.tar"), str(shards / "train-0001.tar")]}}
    assert set(specs) == {k.value for k in SourceKind}, "every kind has a section and a source"
    for kind, keys in specs.items():
        spec = Config.from_dict({"source": {"kind": kind, **keys}}).source
        assert isinstance(spec, SourceSpec) and spec.kind is SourceKind(kind)
        assert len(open_source(spec)) > 0


def test_dataset_label_types_come_from_the_first_readable_items():
    assert DatasetSource("support.datasets:Squares", {"n": 6, "bad": 0}).label_fields() == [pa.field("label", pa.int64())]
    scored = DatasetSource("support.datasets:Scored", {"n": 6})
    assert scored.label_fields() == [pa.field("score", pa.float64())], "an int, then a float: a float column"
    with pytest.raises(ConfigError, match=r"source.target: the label 'score' of 'support.datasets:Scored' holds "
                                          r"values of types float, int, str in the first items"):
        DatasetSource("support.datasets:Scored", {"n": 6, "text_at": 3}).label_fields()


def test_dataset_labels_come_from_readable_items_and_a_none_label_from_a_later_value(caplog):
    # the first 8 items unreadable: the labels were dropped from every row
    assert DatasetSource("support.datasets:Labelled", {"readable_from": 8}).label_fields() == [pa.field("tag", pa.int64())]
    # None in the first items: every later value was a bad sample ("its column holds null")
    late = DatasetSource("support.datasets:Labelled", {"tagged_from": 10})
    assert late.label_fields() == [pa.field("tag", pa.int64())] and late.read([12])[0].labels == {"tag": 12}
    assert "None in every item" not in caplog.text
    late_array = DatasetSource("support.datasets:Labelled", {"tagged_from": 10, "pair": True})
    assert late_array.label_fields() == [] and late_array.array_labels()["tag"].shape == (2,)  # (an array column)
    never = DatasetSource("support.datasets:Labelled", {"n": 100, "tagged_from": 90})
    assert never.label_fields() == [pa.field("tag", pa.null())]
    assert ("the label 'tag' of 'support.datasets:Labelled' is None, or None or empty in a part, in every item looked "
            "at (the first 8 readable ones and up to 64 more): its column holds null") in caplog.text
    # lists empty in the first items (images without boxes): typed by the first later boxes, as
    # a list of nulls every later value was a bad sample
    caplog.clear()
    boxes = DatasetSource("support.datasets:Labelled", {"tagged_from": 10, "boxes": True})
    assert boxes.label_fields() == [pa.field("tag", pa.list_(pa.list_(pa.float64())))]
    assert boxes.read([12])[0].labels == {"tag": [[12, 12.5]]} and "None or empty" not in caplog.text
    none_yet = DatasetSource("support.datasets:Labelled", {"n": 100, "tagged_from": 90, "boxes": True})
    assert none_yet.label_fields() == [pa.field("tag", pa.list_(pa.null()))]
    assert ("in every item looked at (the first 8 readable ones and up to 64 more): its column holds list<item: "
            "null>, and an item that gives it a value there is a bad sample") in caplog.text
    # integers over int64's range (a hash): uint64, not an OverflowError that failed the run
    big = DatasetSource("support.datasets:Labelled", {"offset": 2**63})
    assert big.label_fields() == [pa.field("tag", pa.uint64())]
    with pytest.raises(ConfigError, match="holds integers beyond 64 bits in the first items, which no column holds"):
        DatasetSource("support.datasets:Labelled", {"offset": 2**64}).label_fields()


def test_nested_labels_keep_their_first_items_keys_and_lose_nothing_silently(caplog):
    """Inside a struct, a key the first items lack is left out with a warning, as a label is;
    a fraction in an integer field (which pyarrow would truncate) makes its sample bad."""
    from pipeline._labels import split_unfit

    source = DatasetSource("support.datasets:Annotated", {})
    box = pa.struct([("x", pa.int64())])
    assert source.label_fields() == [pa.field("ann", pa.struct([("n", pa.int64()), ("boxes", pa.list_(box))]))]
    samples = source.read(range(9, 14))
    assert [s.labels["ann"] for s in samples] == [{"n": i, "boxes": [{"x": i + 0.5 if i == 12 else i}]}
                                                  for i in range(9, 14)]
    warned = [r.getMessage() for r in caplog.records if "in none of the items" in r.getMessage()]
    assert warned == ["the label ann['boxes'][]['w'] of 'support.datasets:Annotated' is in none of the items that "
                      "typed its column (the first 8 readable ones): it is not stored"]
    good, bad = split_unfit(samples, source.label_fields())
    assert [s.index for s in good] == [9, 10, 11, 13]
    assert [b.reason for b in bad] == [
        "label 'ann' holds {'n': 12, 'boxes': [{'x': 12.5}]} (type dict); its column holds struct<n: int64, boxes: "
        "list<item: struct<x: int64>>>: ['boxes'][0]['x'] holds 12.5 (type float), which the column would hold as 12"]


def test_a_nested_label_part_that_stays_null_is_typed_from_the_first_items_and_an_empty_dict_is_not_stored(caplog):
    """A part None in every item (a COCO-style optional field) is looked for in later items; one
    of those that fits no type with the first items makes only its own sample bad (it had
    refused the source). A label that is an empty dict in every item is left out: Parquet
    cannot write a struct without fields (every shard had failed)."""
    from pipeline._labels import split_unfit

    source = DatasetSource("support.datasets:Annotated", {"segments": True, "meta": True, "wide_from": 99})
    box = pa.struct([("x", pa.int64())])
    assert source.label_fields() == [pa.field("ann", pa.struct([("n", pa.int64()), ("boxes", pa.list_(box)),
                                                               ("segments", pa.null())]))]
    assert ("the label 'meta' of 'support.datasets:Annotated' holds empty dicts only in every item looked at (the "
            "first 8 readable ones and up to 64 more): a column of struct<> holds nothing, and it is not stored"
            ) in caplog.text
    good, bad = split_unfit(source.read(range(8, 12)), source.label_fields())
    assert [s.index for s in good] == [8, 9, 11] and [b.index for b in bad] == [10]
    assert bad[0].reason.endswith("Could not convert 'many' with type str: tried to convert to int64")


def test_dataset_label_types_are_the_drivers_on_every_worker():
    driver = DatasetSource("support.datasets:DictItems", {"n": 4})
    types = json.loads(json.dumps(driver.label_types()))  # (plain data: it travels to the workers)
    worker = DatasetSource("support.datasets:Labelled", {"n": 4})  # whose items would type other columns
    worker.use_label_types(types)
    assert worker.label_fields() == driver.label_fields() == [pa.field("label", pa.int64())]
    assert worker.array_labels() == driver.array_labels() and worker.array_labels()["box"].shape == (4,)


def test_a_dataset_item_whose_read_may_pass_fails_the_shard_not_the_sample():
    # (a dropped connection was a bad sample for good: a rerun found its shard done)
    source = DatasetSource("support.datasets:Labelled", {"dropping": 12})  # (after the items that type the labels)
    with pytest.raises(ConnectionResetError):
        source.read([11, 12])
    assert [type(s) for s in source.read([11, 12])] == [Sample, Sample]
    # nor do the labels come from the items a blip let through: they would be kept for the dump
    with pytest.raises(ConnectionResetError):
        DatasetSource("support.datasets:Labelled", {"dropping": 2}).label_fields()


def test_a_16_bit_or_float_pil_image_is_scaled_not_clipped():
    from PIL import Image

    from pipeline._images import decode
    from pipeline._sources.dataset import _to_image

    wide = Image.fromarray(np.array([[0, 1000, 65535]], np.uint16))
    assert decode(_to_image(wide))[0].tolist() == [[0.0, np.float32(1000 / 65535), 1.0]]  # (it was [0, 1, 1]: clipped)
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32))
    assert decode(_to_image(floats))[0].tolist() == [[0.0, 0.25, 1.0]]  # (it was [0, 0, 1/255])
    assert decode(wide)[0].tolist() == decode(_to_image(wide))[0].tolist()
    grey = Image.new("L", (2, 1), 200)  # PIL's own wide modes of 0..255 values: as before, 200 of 255
    for image in (grey.convert("F"), grey.convert("I")):
        assert decode(_to_image(image))[0].tolist() == decode(grey)[0].tolist() == [[200, 200]]
    mask = Image.fromarray(np.array([[0, 1]], np.uint8)).convert("F")  # whole numbers in [0, 1]: 0..255 still
    assert decode(_to_image(mask))[0].tolist() == [[0, 1]]


# -- the folder's listing, frozen --------------------------------------------------------------


def _folder(root, n=6):
    for i in range(n):
        cls = "even" if i % 2 == 0 else "odd"
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{i:03d}.png").write_bytes(_png((i * 30, 0, 0)))
    return root


def test_folder_actors_read_the_drivers_listing_not_the_tree(tmp_path):
    from pipeline._sources import IndexFile, write_index
    from pipeline._store import OutputStore

    root = _folder(tmp_path / "images")
    driver = FolderSource(str(root))
    store = OutputStore(str(tmp_path / "out"))
    store.make_dirs("_actmap")
    write_index(store.fs, store.path("_actmap/index.parquet"), driver.index)
    (root / "even" / "000a.png").write_bytes(_png("green"))  # the folder changes after planning
    actor = FolderSource(str(root), index=IndexFile(store.fs, store.path("_actmap/index.parquet")))
    assert len(actor) == len(driver) == 6
    assert actor.identity() == driver.identity()
    assert [s.sample_id for s in actor.stream(0, 6)] == [s.sample_id for s in driver.stream(0, 6)]
    assert [s.labels["class_name"] for s in actor.stream(2, 4)] == ["even", "odd"]
    assert FolderSource(str(root)).identity() != driver.identity()  # a new listing sees the change


def test_folder_on_object_storage(tmp_path, s3):
    from support.storage import upload

    root = _folder(tmp_path / "images")
    upload(root, f"s3://data/images?{s3}")
    remote, local = FolderSource(f"s3://data/images?{s3}"), FolderSource(str(root))
    assert len(remote) == len(local) and remote.classes == local.classes == ["even", "odd"]
    got, want = list(remote.stream(1, 5)), list(local.stream(1, 5))
    assert [s.sample_id for s in got] == [s.sample_id for s in want]
    assert [s.image for s in got] == [s.image.load() for s in want]
    assert [s.labels for s in got] == [s.labels for s in want]


def test_objects_whose_keys_no_path_reaches_are_left_out_with_a_warning(tmp_path, s3, caplog):
    # "a//b.png" was listed, then failed its shard on every try ("Empty path component"), so the
    # dump could never finish; "a/./b.png" was listed and then not found
    import boto3

    from support.storage import upload

    root = _folder(tmp_path / "images")
    upload(root, f"s3://data/images?{s3}")
    endpoint = "http://" + s3.split("endpoint_override=")[1].split("&")[0]
    client = boto3.client("s3", endpoint_url=endpoint)
    png = (root / "even" / "000.png").read_bytes()
    for key in ("images/sub//x.png", "images/./dot.png", "images/a/../dd.png"):
        client.put_object(Bucket="data", Key=key, Body=png)
    remote = FolderSource(f"s3://data/images?{s3}")
    assert len(remote) == len(FolderSource(str(root)))
    assert not any(isinstance(s, BadSample) for s in remote.stream(0, len(remote)))
    assert "3 object(s) under" in caplog.text and "which no path reaches, and are left out" in caplog.text


def test_a_folder_that_cannot_be_listed_is_a_config_error(tmp_path, monkeypatch):
    # it was exit 1 and "rerun the same command to resume", though nothing had started
    root = _folder(tmp_path / "images")
    scandir = os.scandir

    def forbidden(path):
        if str(path).rstrip("/").endswith("odd"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", forbidden)
    with pytest.raises(ConfigError, match=r"source.path: cannot list '.*images': PermissionError: .*odd.*; make every "
                                          r"folder under it readable"):
        FolderSource(str(root))


# -- Parquet read as a stream --------------------------------------------------------------------


def _many_files(folder, files, groups=5, rows=200, image_bytes=1024):
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in range(files):
        count = groups * rows
        table = pa.table({"image": pa.array([rng.bytes(image_bytes) for _ in range(count)], pa.binary()),
                          "key": [f"id-{n + i}" for i in range(count)], "label": list(range(n, n + count))})
        pq.write_table(table, folder / f"part-{f:03d}.parquet", row_group_size=rows)
        n += count
    return folder, n


def test_parquet_stream_gives_the_rows_in_order_across_files_and_groups(tmp_path):
    folder, n = _many_files(tmp_path / "t", files=3, groups=2, rows=7)
    source = ParquetSource(str(folder), id_column="key")
    assert len(source) == n == 42
    got = list(source.stream(5, 30))
    assert [s.index for s in got] == list(range(5, 30))
    assert [s.sample_id for s in got] == [f"id-{i}" for i in range(5, 30)]
    assert [s.labels["label"] for s in got] == list(range(5, 30))
    assert [s.sample_id for s in source.read([41, 0, 13])] == ["id-41", "id-0", "id-13"]


def test_parquet_shard_cost_depends_on_neither_its_position_nor_the_dataset_size(tmp_path):
    from support.storage import bytes_read

    def cost(source, start, stop):
        before = bytes_read()
        assert len(list(source.stream(start, stop))) == stop - start
        return bytes_read() - before

    big, n = _many_files(tmp_path / "big", files=20)  # 20,000 rows of 1 KB
    small, _ = _many_files(tmp_path / "small", files=2)
    total = sum(p.stat().st_size for p in big.iterdir())
    source = ParquetSource(str(big))
    first, last, middle = cost(source, 0, 300), cost(source, n - 300, n), cost(source, 9_950, 10_250)
    alone = cost(ParquetSource(str(small)), 0, 300)
    payload = 300 * 1024
    for c in (first, last, middle, alone):
        assert payload <= c < 4 * payload, (first, last, middle, alone, payload)
    assert max(first, last, middle, alone) < 3 * min(first, last, middle, alone)
    assert first < total / 20


def test_parquet_null_ids_are_bad_samples_and_repeats_are_reported(tmp_path):
    table = pa.table({"image": [_png("red")] * 4, "key": ["a", None, "b", "a"]})
    pq.write_table(table, tmp_path / "t.parquet")
    source = ParquetSource(str(tmp_path / "t.parquet"), id_column="key")
    samples = source.read(range(4))
    assert isinstance(samples[1], BadSample) and samples[1].reason == "the id (key) is null"
    assert samples[1].sample_id == "1"
    assert source.repeated_ids == {"count": 1, "examples": ["a"]}


def test_parquet_on_object_storage(tmp_path, s3):
    from support.storage import upload

    folder, n = _many_files(tmp_path / "t", files=2, groups=2, rows=5, image_bytes=16)
    upload(folder, f"s3://data/table?{s3}")
    remote = ParquetSource(f"s3://data/table?{s3}", id_column="key")
    local = ParquetSource(str(folder), id_column="key")
    assert len(remote) == n and remote.identity()["index_sha256"] == local.identity()["index_sha256"]
    assert [(s.sample_id, s.image) for s in remote.stream(3, 17)] == [(s.sample_id, s.image) for s in local.stream(3, 17)]
    # each file's footer read once and kept; small row groups pre-buffered (a request per group)
    assert [s.index for s in remote.stream(0, n)] == list(range(n))
    assert sorted(remote._footers) == ["part-000.parquet", "part-001.parquet"]
    assert all(pre_buffer for _, pre_buffer in remote._footers.values())
    assert len(list(local.stream(0, n))) == n
    assert not any(pre_buffer for _, pre_buffer in local._footers.values())


def test_the_driver_asks_no_parquet_file_its_size(tmp_path, s3, caplog):
    # the listing gives the sizes: each footer is one ranged GET, with no HEAD before it, and
    # the search for repeated ids reads each file's ids with no request for its size or footer
    import logging

    from support.storage import upload

    folder, n = _many_files(tmp_path / "t", files=8, groups=1, rows=3, image_bytes=16)
    upload(folder, f"s3://data/table?{s3}")
    caplog.set_level(logging.INFO, "werkzeug")
    caplog.clear()
    assert len(ParquetSource(f"s3://data/table?{s3}", id_column="key")) == n
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", r.getMessage()) for r in caplog.records]
    requests = [line.split('"')[1].split()[0] for line in lines if line.count('"') >= 2]
    # the root's kind, its listing (two requests), then per file its footer and its ids
    assert requests.count("HEAD") <= 1 and len(requests) <= 3 + 2 * 8, lines


def test_parquet_on_object_storage_streams_large_row_groups_page_by_page(tmp_path, s3, monkeypatch):
    from pipeline._sources import parquet
    from support.storage import upload

    folder, n = _many_files(tmp_path / "t", files=2, groups=2, rows=5, image_bytes=16)
    upload(folder, f"s3://data/table?{s3}")
    monkeypatch.setattr(parquet, "PRE_BUFFER_LIMIT", 100)  # every group is "too large to hold"
    remote = ParquetSource(f"s3://data/table?{s3}", id_column="key")
    assert [s.sample_id for s in remote.stream(0, n)] == [f"id-{i}" for i in range(n)]
    assert not any(pre_buffer for _, pre_buffer in remote._footers.values())


def test_read_ahead_keeps_order_raises_in_place_and_stops_when_the_caller_does():
    import threading
    import time

    from pipeline._sources._files import read_ahead

    assert list(read_ahead(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        yield 2
        raise OSError("the store went away")

    got = []
    with pytest.raises(OSError, match="the store went away"):
        for item in read_ahead(failing(), depth=4):
            got.append(item)
    assert got == [1, 2]  # the error comes after the items before it

    produced, closed = [], threading.Event()

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    ahead = read_ahead(endless(), depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    time.sleep(0.2)
    assert len(produced) <= 3 + 2 + 1  # no more than depth ahead (one more in the thread's hand)
    ahead.close()
    assert closed.is_set()  # the source generator was closed, in the reading thread
    assert not [t for t in threading.enumerate() if t.name == "actmap-read-ahead"]


def test_parquet_streams_of_one_source_run_side_by_side(tmp_path):
    """The shards a worker runs at once stream the same source from their own threads."""
    import threading

    folder, n = _many_files(tmp_path / "t", files=4, groups=3, rows=50, image_bytes=64)
    source = ParquetSource(str(folder), id_column="key")
    got: dict[int, list[str]] = {}

    def read(start):
        got[start] = [s.sample_id for s in source.stream(start, start + 250)]

    threads = [threading.Thread(target=read, args=(start,)) for start in range(0, n, 250)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [i for start in sorted(got) for i in got[start]] == [f"id-{i}" for i in range(n)]


def test_a_shard_at_the_start_of_a_large_row_group_does_not_read_the_whole_group(tmp_path):
    from support.storage import bytes_read

    folder, n = _many_files(tmp_path / "one", files=1, groups=1, rows=20_000, image_bytes=4096)  # 80 MB, one group
    source = ParquetSource(str(folder))
    before = bytes_read()
    assert len(list(source.stream(0, 300))) == 300
    assert bytes_read() - before < 8_000_000  # a few pages, not the group's 80 MB
    assert source.largest_row_group == 20_000


def test_shards_in_turn_inside_one_large_row_group_read_it_once(tmp_path):
    # Parquet cannot start a read inside a row group: each shard read its group from the start,
    # so the shards of one group cost more and more (here 8.5 times the group in all)
    import itertools

    from support.storage import bytes_read

    folder, n = _many_files(tmp_path / "one", files=1, groups=1, rows=4_096, image_bytes=2048)  # 8 MB, one group
    size = next(folder.iterdir()).stat().st_size
    source = ParquetSource(str(folder), id_column="key")

    def shard(start: int, stop: int) -> list[int]:  # as a worker takes it: the rows, then the stream closed
        stream = source.stream(start, stop)
        try:
            return [s.labels["label"] for s in itertools.islice(stream, stop - start)]
        finally:
            stream.close()

    before = bytes_read()
    labels = [label for start in range(0, n, 256) for label in shard(start, start + 256)]
    assert labels == list(range(n))
    assert bytes_read() - before < 1.5 * size, (bytes_read() - before, size)
    # shards out of order read the right rows (a read is taken only where it has not passed the start)
    assert shard(1_000, 1_300) == list(range(1_000, 1_300)) and shard(300, 600) == list(range(300, 600))
    assert shard(1_300, 1_310) == list(range(1_300, 1_310))
    source.close()  # the reads kept open in the group are closed with the source
    assert not source._parked._readers


def test_file_names_that_are_not_utf8_are_left_out_with_a_warning(tmp_path, caplog):
    import os

    (tmp_path / "ok.png").write_bytes(_png("red"))
    os.close(os.open(os.path.join(os.fsencode(str(tmp_path)), b"bad-\xff.png"), os.O_CREAT | os.O_WRONLY))
    source = FolderSource(str(tmp_path))
    assert [s.sample_id for s in source.stream(0, len(source))] == ["ok.png"]
    assert "1 file name(s) under" in caplog.text and "are not UTF-8" in caplog.text


def test_the_local_listing_is_in_the_order_of_sorted_paths(tmp_path):
    # the walk sorts each folder, not the whole list: names that sort around "/" must still
    # come in the order of their whole paths, as a listing on object storage gives them
    import os

    from pipeline._sources._files import Location, list_tree

    names = ["a/x.png", "a-b.png", "a-b/y.png", "a.png", "a b/z.png", "a/b/c.png", "a/b-c.png", "a/b.png",
             "a/b/c/d.png", "a0/e.png", "Z.png", "é/f.png", "e/g.png", "a/notes.txt", "b/.hidden.png", "a.b/h.png"]
    for name in names:
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    listed = list_tree(Location(str(tmp_path)), {".png"}).column("path").to_pylist()
    expected = sorted(n for n in names if n.endswith(".png"))
    assert listed == expected
    assert listed == sorted(listed, key=lambda p: p.encode())  # as Arrow sorts: by UTF-8 bytes


@pytest.mark.parametrize("size", [0, 1, 2_000, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, 3_000_000])
def test_a_local_file_is_read_whole_whatever_its_size(tmp_path, size):
    from pipeline._sources._files import read_local

    path = tmp_path / "image.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    assert read_local(str(path)) == data


def test_a_local_read_that_fails_names_the_file_and_is_the_samples_fault(tmp_path):
    from pipeline._sources._base import is_sample_fault
    from pipeline._sources._files import read_local

    (tmp_path / "a.jpg").mkdir()  # a folder where the listing saw a file
    for name, error in (("a.jpg", IsADirectoryError), ("gone.jpg", FileNotFoundError)):
        with pytest.raises(error, match=name) as caught:
            read_local(str(tmp_path / name))
        assert is_sample_fault(caught.value)


def test_a_missing_bucket_or_prefix_is_named(s3):
    for make in (FolderSource, ParquetSource):
        with pytest.raises(ConfigError, match=r"'s3://nobucket/x\?.*' does not exist"):
            make(f"s3://nobucket/x?{s3}")


def test_links_to_folders_list_each_file_once_and_never_loop(tmp_path, caplog):
    png = _png((1, 2, 3))
    for name in ("images/cat/a.png", "images/dog/b.png", "elsewhere/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png)
    (tmp_path / "images" / "cat" / "loop").symlink_to("..")  # would list images/ again and again
    (tmp_path / "images" / "a-dog").symlink_to("dog")  # sorts first: dog's files are listed by their own path
    (tmp_path / "images" / "more").symlink_to(tmp_path / "elsewhere")  # outside the tree: followed
    (tmp_path / "images" / "more2").symlink_to(tmp_path / "elsewhere")  # the same folder again: once, first in order
    source = FolderSource(str(tmp_path / "images"))
    assert source.index.table.column("path").to_pylist() == ["cat/a.png", "dog/b.png", "more/c.png"]
    assert "3 link(s) to folders under" in caplog.text


def test_links_that_lead_nowhere_are_left_out_and_said(tmp_path, caplog):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "cat" / "b.png").symlink_to(tmp_path / "gone.png")  # (left out before, without a word)
    (tmp_path / "cat" / "notes.txt").symlink_to(tmp_path / "gone.txt")  # no image: not said
    assert FolderSource(str(tmp_path)).index.table.column("path").to_pylist() == ["cat/a.png"]
    assert "1 link(s) under" in caplog.text and "lead nowhere (their target is gone) and are left out, e.g. 'cat/b.png'" \
        in caplog.text


def test_a_few_files_beside_class_folders_cost_the_labels_and_say_so(tmp_path, caplog):
    for name in [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(60)] + ["stray.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(_png((1, 2, 3)))
    assert FolderSource(str(tmp_path)).classes == []
    assert "1 of the 121 files lie beside the folders, not in one (e.g. 'stray.png')" in caplog.text


def test_parquet_hive_folders_give_columns(tmp_path):
    png = _png((5, 6, 7))
    for folder, keys in (("label=0/kind=a%2Fb", ["k0", "k1"]), ("label=1", ["k2"]), ("label=__HIVE_DEFAULT_PARTITION__", ["k3"])):
        (tmp_path / "t" / folder).mkdir(parents=True)
        pq.write_table(pa.table({"image": [png] * len(keys), "key": keys}), tmp_path / "t" / folder / "part-0.parquet")
    source = ParquetSource(str(tmp_path / "t"), id_column="key")
    assert [(f.name, f.type) for f in source.label_fields()] == [("label", pa.int64()), ("kind", pa.string())]
    assert [(s.sample_id, s.labels) for s in source.stream(0, 4)] == [
        ("k0", {"label": 0, "kind": "a/b"}), ("k1", {"label": 0, "kind": "a/b"}),
        ("k2", {"label": 1, "kind": None}), ("k3", {"label": None, "kind": None})]
    # a file's own column of that name comes first
    pq.write_table(pa.table({"image": [png], "key": ["k4"], "label": [7]}), tmp_path / "t" / "label=1" / "part-1.parquet")
    assert [s.labels["label"] for s in ParquetSource(str(tmp_path / "t"), id_column="key").stream(0, 5)] == [0, 0, 1, 7, None]


def test_a_folder_on_a_network_file_system_is_fetched_ahead_of_the_decoder(tmp_path, monkeypatch):
    # on a local disk the decoding threads read the files; on NFS each read waits on the
    # network, so a pool of readers fetches them ahead, as on object storage
    from support.storage import on_network_mount

    for name, colour in [("a/1.png", "red"), ("a/2.png", "green"), ("b/3.png", "blue")]:
        os.makedirs(tmp_path / "data" / os.path.dirname(name), exist_ok=True)
        (tmp_path / "data" / name).write_bytes(_png(colour))
    on_network_mount(monkeypatch, tmp_path / "data")
    source = FolderSource(str(tmp_path / "data"))
    (tmp_path / "data" / "a" / "2.png").unlink()
    got = list(source.stream(0, 3))
    assert source._readers is not None
    assert got[0].image == _png("red") and got[0].labels == {"label": 0, "class_name": "a"}
    assert isinstance(got[1], BadSample) and got[1].sample_id == "a/2.png" and "No such file" in got[1].reason
    assert got[2].image == _png("blue") and got[2].labels == {"label": 1, "class_name": "b"}
    source.close()


def test_parquet_on_a_network_file_system_is_read_ahead_of_the_decoder(tmp_path, monkeypatch):
    from support.storage import on_network_mount

    folder, n = _many_files(tmp_path / "t", files=2, groups=3, rows=50)
    local = ParquetSource(str(folder), id_column="key")
    expected = [s.labels["label"] for s in local.stream(20, 280)]
    from pipeline._sources import parquet as parquet_module

    ahead, read_ahead = [], parquet_module.read_ahead  # the depth of each read ahead
    monkeypatch.setattr(parquet_module, "read_ahead", lambda items, depth: ahead.append(depth) or read_ahead(items, depth))
    assert [s.labels["label"] for s in local.stream(20, 280)] == expected and ahead == []
    on_network_mount(monkeypatch, folder, "lustre")
    remote = ParquetSource(str(folder), id_column="key")
    assert [s.labels["label"] for s in remote.stream(20, 280)] == expected == list(range(20, 280))
    # each row group's columns come in one request, the next batches on their way meanwhile
    assert ahead == [parquet_module.READ_AHEAD]
    assert all(pre_buffer for _, pre_buffer in remote._footers.values())
    assert not any(pre_buffer for _, pre_buffer in local._footers.values())


def test_files_beside_the_parquet_data_are_left_out_or_named(tmp_path, caplog):
    # a README.md beside the data (every Hugging Face dataset repository has one), a partial
    # download: left out where the data files end in .parquet. A damaged .parquet file is named
    folder, n = _many_files(tmp_path / "t", files=2, groups=1, rows=5)
    (folder / "README.md").write_text("# a dataset")
    (folder / "part-002.parquet.tmp").write_bytes(b"PAR1...")
    pq.write_table(pq.read_table(folder / "part-000.parquet"), folder / "000009_0")  # Hive's: no extension, kept
    source = ParquetSource(str(folder), id_column="key")
    assert len(source) == n + 5 == 15
    assert "2 file(s) in" in caplog.text and "do not end in .parquet and are left out, e.g. 'README.md'" in caplog.text
    (folder / "zz.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"source.path: 'zz.parquet' is not a Parquet file that can be read "
                                          r"\(.*0 bytes\); remove it, or point source.path at the data files"):
        ParquetSource(str(folder), id_column="key")


def test_ids_stored_as_binary_are_their_text(tmp_path):
    # Hive and older Spark write text as binary: the ids were "b'k0'"; bytes that are not UTF-8
    # are their hex digits
    image = _png("red")
    pq.write_table(pa.table({"image": [image] * 3, "key": pa.array([b"k0", b"k1", b"\xff\x01"], pa.binary())}),
                   tmp_path / "0.parquet")
    pq.write_table(pa.table({"image": [image], "key": ["k0"]}), tmp_path / "1.parquet")
    source = ParquetSource(str(tmp_path), id_column="key")
    assert [s.sample_id for s in source.stream(0, 4)] == ["k0", "k1", "ff01", "k0"]
    assert source.repeated_ids["examples"] == ["k0"]  # the text and the bytes are one id


def test_a_damaged_row_group_makes_its_rows_bad_and_names_it(tmp_path):
    folder, n = _many_files(tmp_path / "t", files=2, groups=3, rows=40)
    path = folder / "part-001.parquet"
    groups = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    start = groups.row_group(1).column(0).data_page_offset  # the second group's first image page
    data[start:start + 32] = b"\xff" * 32  # its header
    path.write_bytes(bytes(data))
    samples = list(ParquetSource(str(folder), id_column="key").stream(100, 200))
    bad = [s for s in samples if isinstance(s, BadSample)]
    assert [s.index for s in samples] == list(range(100, 200))
    assert bad and all(160 <= s.index < 200 for s in bad), [s.index for s in bad]
    assert bad[0].reason.startswith("row group 1 of 'part-001.parquet' cannot be read: ")
    assert [s.labels["label"] for s in samples if not isinstance(s, BadSample)][:60] == list(range(100, 160))


def test_a_page_whose_checksum_fails_makes_its_rows_bad(tmp_path):
    # the file's pages carry CRCs, which were not checked: damaged bytes went on as images
    images = [_png((i, 0, 0)) for i in range(30)]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"image": images, "key": [f"k{i}" for i in range(30)]}), path, row_group_size=10,
                   compression="none", use_dictionary=False, write_page_checksum=True)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    middle = column.data_page_offset + column.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])  # inside the images' bytes
    path.write_bytes(bytes(data))
    samples = list(ParquetSource(str(path), id_column="key").stream(0, 30))
    bad = [s.index for s in samples if isinstance(s, BadSample)]
    assert bad == list(range(10, 20))
    assert samples[10].reason.startswith("row group 1 of 'a.parquet' cannot be read: ") and "CRC" in samples[10].reason
    assert [s.image for s in samples if not isinstance(s, BadSample)] == images[:10] + images[20:]


def test_image_columns_by_path_dictionary_or_all_null(tmp_path):
    image = _png("red")
    pq.write_table(pa.table({"image": pa.array([image, image]).dictionary_encode(), "key": ["a", "b"]}),
                   tmp_path / "0.parquet")
    pq.write_table(pa.table({"image": pa.nulls(1), "key": ["c"]}), tmp_path / "1.parquet")
    # images not embedded, as Hugging Face datasets write them: a path and no bytes
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "d.png"}],
                                               pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                             "key": ["d"]}), tmp_path / "2.parquet")
    samples = list(ParquetSource(str(tmp_path), id_column="key").stream(0, 4))
    assert [s.image for s in samples[:2]] == [image, image]
    assert samples[2].reason == "the image value is null"
    assert samples[3].reason.startswith("the image holds no bytes, only the path 'd.png': the images are read "
                                        "from the table, not from the files its paths name")


def test_a_key_of_the_hive_folders_is_no_image_or_id_column(tmp_path):
    # it passed the check (the keys were taken for columns of the files), then the driver's read
    # failed on "No match for FieldRef.Name(key)": exit 1, "rerun to resume"
    for key in ("a", "b"):
        (tmp_path / "t" / f"key={key}").mkdir(parents=True)
        pq.write_table(pa.table({"image": [_png("red")] * 2, "n": [1, 2]}), tmp_path / "t" / f"key={key}" / "p.parquet")
    for setting, role in (("id_column", "id"), ("image_column", "image")):
        with pytest.raises(ConfigError, match=fr"source.{setting}: 'key' is a key of the hive-style folders \(e.g. "
                                              fr"'key=a/'\), not a column stored in the files: the {role} column "
                                              "must be a column of the files"):
            ParquetSource(str(tmp_path / "t"), **{setting: "key"})
    with pytest.raises(ConfigError, match=r"source.id_column: no column 'm' in .*; valid: 'image', 'n'$"):
        ParquetSource(str(tmp_path / "t"), id_column="m")  # (the files' own columns)
    source = ParquetSource(str(tmp_path / "t"), id_column="n")  # the key still passes through
    assert [s.labels["key"] for s in source.stream(0, 4)] == ["a", "a", "b", "b"]


def test_a_file_with_two_columns_of_one_name_is_named_where_it_reads_them(tmp_path):
    # pyarrow writes such files: "KeyError: 'Column x does not exist in schema'", exit 1
    n = pa.array([3, 4, 5])
    pq.write_table(pa.Table.from_arrays([pa.array([_png("red")] * 3), n, n, pa.array(["a", "b", "c"])],
                                        names=["image", "x", "x", "y"]), tmp_path / "t.parquet")
    path = str(tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=r"source.columns: 't.parquet' has 2 columns named 'x', and a column is "
                                          r"read by its name: rename all but one of them in the file, or leave it "
                                          r"out \(source.columns\)"):
        ParquetSource(path)
    with pytest.raises(ConfigError, match=r"source.id_column: 't.parquet' has 2 columns named 'x'.*, or name another"):
        ParquetSource(path, id_column="x", columns=[])
    source = ParquetSource(path, id_column="y", columns=[])  # left out, it is no matter
    assert [(s.sample_id, s.labels, s.image == _png("red")) for s in source.stream(0, 3)] == [
        ("a", {}, True), ("b", {}, True), ("c", {}, True)]
    pq.write_table(pa.Table.from_arrays([pa.array([_png("red")] * 3)] * 2, names=["image", "image"]), path)
    with pytest.raises(ConfigError, match=r"source.image_column: 't.parquet' has 2 columns named 'image'"):
        ParquetSource(path)


def _damaged_id_page(path, checksums: bool, keys=("k0", "k1", "k2", "k3", "k0", "k1", "k6", "k7", "k2", "k9", "k10",
                                                 "k11")) -> None:
    """``path``: 12 rows in row groups of 4 (the second repeats k0 and k1, the third k2), whose second
    group's id page is damaged: the last two ids overwritten (which cannot be decoded), or with
    ``checksums`` a byte of its last id's text changed (which decodes: "k7" as "k\\x0c")."""
    keys = list(keys)
    pq.write_table(pa.table({"image": [_png((i, 0, 0)) for i in range(12)], "key": keys}), path, row_group_size=4,
                   compression="none", use_dictionary=False, write_page_checksum=checksums)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    end = column.data_page_offset + column.total_compressed_size
    data = bytearray(path.read_bytes())
    if checksums:
        data[end - 1] ^= 0x3B  # "k7" -> "k\x0c"
    else:
        data[end - 12:end] = b"\xff" * 12
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("checksums", [False, True])
def test_a_damaged_id_page_is_left_out_of_the_repeated_ids_on_a_local_disk(tmp_path, caplog, checksums):
    # the driver's search for repeated ids read the ids outside any try: ArrowInvalid, exit 1,
    # "rerun to resume" forever; a page that failed its CRC went on as ids
    _damaged_id_page(tmp_path / "a.parquet", checksums)
    source = ParquetSource(str(tmp_path / "a.parquet"), id_column="key")
    assert "the ids (key) of row group(s) 1 of 'a.parquet' cannot be read (" in caplog.text
    assert source.repeated_ids == {"count": 1, "examples": ["k2"]}
    assert caplog.text.count("cannot be read") == 1  # (though the ids stream by twice)
    samples = list(source.stream(0, 12))
    assert [s.index for s in samples if isinstance(s, BadSample)] == [4, 5, 6, 7]
    assert samples[4].reason.startswith("row group 1 of 'a.parquet' cannot be read: ")
    assert [s.sample_id for s in samples if not isinstance(s, BadSample)] == ["k0", "k1", "k2", "k3", "k2", "k9",
                                                                              "k10", "k11"]


def test_the_ids_a_failed_read_gave_are_counted_once(tmp_path, monkeypatch):
    # a file's ids are read again row group by row group from where its read stopped, which may
    # be inside a group (the scan's read-ahead may raise before it gives the batches it read first)
    import pyarrow.dataset as ds

    from pipeline._sources import parquet

    monkeypatch.setattr(parquet, "ID_BATCH_ROWS", 2)
    _damaged_id_page(tmp_path / "a.parquet", False, ["a", "b", "c", "d", "e", "f", "g", "h", "c", "j", "k", "l"])
    source = ParquetSource(str(tmp_path / "a.parquet"), id_column="key")
    assert source.repeated_ids == {"count": 1, "examples": ["c"]}
    fragment = ds.ParquetFileFormat().make_fragment(str(tmp_path / "a.parquet"), source.location.fs)
    for given, rest in ((0, "abcdcjkl"), (3, "dcjkl"), (4, "cjkl"), (5, "cjkl")):
        assert [i for ids in source._ids_by_group(fragment, given, set()) for i in ids.to_pylist()] == list(rest)


def test_a_damaged_id_page_over_the_network_is_an_error_that_names_it(tmp_path, monkeypatch):
    # the count is part of the dump's identity: one short of a row group a network error cost
    # must not become it
    from support.storage import on_network_mount

    (tmp_path / "t").mkdir()
    _damaged_id_page(tmp_path / "t" / "a.parquet", checksums=False)
    on_network_mount(monkeypatch, tmp_path / "t")
    with pytest.raises(OSError, match=r"cannot read the ids \(key\) of row group 1 of 'a.parquet': "):
        ParquetSource(str(tmp_path / "t"), id_column="key")


def test_nulls_inside_lists_maps_and_structs_take_the_other_files_types(tmp_path, caplog):
    # pandas types a column of empty lists list<null>: it was refused beside list<string>; so
    # were struct<y: null> beside struct<y: string>, maps of other widths, structs of other fields
    (tmp_path / "t").mkdir()
    png = _png("red")
    pq.write_table(pa.table({"image": [png], "tags": pa.array([[]]), "s": pa.array([{"y": None}]),
                             "m": pa.array([[("a", 1)]], pa.map_(pa.string(), pa.int32())),
                             "t": pa.array([{"y": 1}], pa.struct([("y", pa.uint64())]))}), tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": [png], "tags": [["cat"]], "s": [{"y": "b"}],
                             "m": pa.array([[("b", 2 ** 40)]], pa.map_(pa.string(), pa.uint64())),
                             "t": pa.array([{"z": "c", "y": -1}])}), tmp_path / "t" / "1.parquet")
    for f, m in (("0", pa.map_(pa.string(), pa.int32())), ("1", pa.map_(pa.string(), pa.uint64()))):
        assert pq.read_schema(tmp_path / "t" / f"{f}.parquet").field("m").type == m
    source = ParquetSource(str(tmp_path / "t"))
    assert {f.name: str(f.type) for f in source.label_fields()} == {
        "tags": "list<element: string>", "s": "struct<y: string>", "m": "map<string, int64>",
        "t": "struct<y: int64, z: string>"}
    assert [s.labels for s in source.stream(0, 2)] == [
        {"tags": [], "s": {"y": None}, "m": [("a", 1)], "t": {"y": 1}},
        {"tags": ["cat"], "s": {"y": "b"}, "m": [("b", 2 ** 40)], "t": {"z": "c", "y": -1}}]
    assert ("the column 't' is struct<y: uint64> in '0.parquet' but struct<z: string, y: int64> in '1.parquet': the "
            "output holds it as struct<y: int64, z: string>, so in its field 'y', a value over") in caplog.text
    assert "the output holds it as map<string, int64>, so in a value of its map, a value over" in caplog.text
    # a null agrees with both, but they do not agree with each other: those two are named
    pq.write_table(pa.table({"image": [png], "tags": pa.array([[1]])}), tmp_path / "t" / "2.parquet")
    with pytest.raises(ConfigError, match=r"the column 'tags' is list<element: string> in '1.parquet' but "
                                          r"list<element: int64> in '2.parquet'"):
        ParquetSource(str(tmp_path / "t"))


def test_not_held_looks_inside_maps():
    from pipeline._sources.parquet import _not_held

    assert _not_held(pa.map_(pa.string(), pa.uint64()), pa.map_(pa.string(), pa.int64())) == \
        "in a value of its map, a value over 9,223,372,036,854,775,807"
    assert _not_held(pa.map_(pa.string(), pa.int32()), pa.map_(pa.string(), pa.int64())) is None


def test_a_column_type_changed_in_a_later_file_changes_the_identity(tmp_path):
    # only the first file's schema was in the index's digest: a rerun after b.parquet's n went
    # from int32 to int64 resumed with int32, and the rows redone were bad samples
    def write(b_type):
        for f, kind in (("a", pa.int32()), ("b", b_type)):
            pq.write_table(pa.table({"image": [_png("red")] * 2, "n": pa.array([1, 2], kind)}),
                           tmp_path / "t" / f"{f}.parquet")

    (tmp_path / "t").mkdir()
    identities = []
    for b_type in (pa.int32(), pa.int64(), pa.int16()):
        write(b_type)
        identity = ParquetSource(str(tmp_path / "t")).identity()
        identities.append((identity["index_sha256"], identity["schemas_sha256"]))
    assert identities[0][1] is None and len(set(identities)) == 3, identities


@pytest.mark.parametrize("second", [pa.int32(), pa.int64()], ids=["one schema", "two schemas"])
def test_the_index_digest_is_as_before_the_other_files_schemas_counted(tmp_path, second):
    # the dumps begun then must resume, those over files of differing schemas too: the digest is
    # the one of that version (pinned), the other files' schemas a key of their own
    for f, kind in ((0, pa.int32()), (1, second)):
        pq.write_table(pa.table({"image": [b"\x89PNG"] * 3, "key": ["a", f"b{f}", "c"],
                                 "n": pa.array([1, 2, 3], kind)}), tmp_path / f"{f}.parquet", row_group_size=2)
    source = ParquetSource(str(tmp_path), id_column="key")
    assert source.repeated_ids == {"count": 2, "examples": ["a", "c"]}
    assert source.identity()["index_sha256"] == "e2cc9c376d7b8ac0d5a5be15a543413ed96c9ab32e72429665619ac7f9884a77"
    assert (source.identity()["schemas_sha256"] is None) == (second == pa.int32())


def test_parquet_objects_whose_keys_no_path_reaches_are_left_out_with_a_warning(tmp_path, s3, caplog):
    # "t/sub//b.parquet" made the whole folder refused: "is not a Parquet file that can be read
    # (Empty path component ...)"
    import boto3

    from support.storage import upload

    folder, n = _many_files(tmp_path / "t", files=2, groups=1, rows=3, image_bytes=16)
    upload(folder, f"s3://data/t?{s3}")
    endpoint = "http://" + s3.split("endpoint_override=")[1].split("&")[0]
    boto3.client("s3", endpoint_url=endpoint).put_object(
        Bucket="data", Key="t/sub//b.parquet", Body=(folder / "part-000.parquet").read_bytes())
    source = ParquetSource(f"s3://data/t?{s3}", id_column="key")
    assert len(source) == n == 6
    assert "1 object(s) in" in caplog.text
    assert "which no path reaches, and are left out, e.g. 'sub//b.parquet'" in caplog.text
    (tmp_path / "x").mkdir()  # the folder's own path may have such parts: only those below it count
    assert len(ParquetSource(f"file://{tmp_path}/x/../t", id_column="key")) == 6


def test_parquet_samples_name_the_labels_taken_from_a_column_of_their_fields_type(tmp_path):
    # those are not checked again (a list of 512 floats cost up to 20 us a row to check)
    (tmp_path / "t").mkdir()
    png = _png("red")
    emb = pa.array([[0.5, 1.5]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"image": [png], "score": pa.array([1], pa.int64()), "emb": emb}), tmp_path / "t" / "0.parquet")
    pq.write_table(pa.table({"image": [png], "score": pa.array([2], pa.int32()), "emb": emb}), tmp_path / "t" / "1.parquet")
    source = ParquetSource(str(tmp_path / "t"))
    assert {f.name: str(f.type) for f in source.label_fields()} == {"score": "int64", "emb": "list<element: float>"}
    assert [(s.labels, s.exact) for s in source.stream(0, 2)] == [
        ({"score": 1, "emb": [0.5, 1.5]}, frozenset({"score", "emb"})),
        ({"score": 2, "emb": [0.5, 1.5]}, frozenset({"emb"}))]
