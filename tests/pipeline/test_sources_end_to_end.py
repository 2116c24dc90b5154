"""Each source through a whole run (local executor, two workers), its rows compared with a
plain forward of the same model on the same images, read and decoded without actmap."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import read_layer, read_table, run
from pipeline._layout import SOURCE_INDEX_PATH
from pipeline._models import build_model
from pipeline.config import Config

SIZE = 12


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


def _direct(config: Config, images: list[bytes]) -> np.ndarray:
    """relu1 of the tiny model on these PNGs, decoded by PIL and normalised by hand."""
    model = build_model(config.model)
    x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                     for b in images]).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in config.source.preprocess.mean_std())
    with torch.no_grad():
        return model.relu1(model.conv1((x - mean) / std)).numpy()


def _run(tmp_path, source: dict) -> Config:
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1"]}, "source": source,
                               "dump": {"dtype": "float32"},
                               "run": {"output": str(tmp_path / "out"), "executor": "local", "actors": 2,
                                       "batch_size": 4, "shard_size": 8}})
    summary = run(config, stream=None)
    assert summary.bad == []
    return config


def _check(config: Config, ids: list[str], images: list[bytes]) -> None:
    table = read_table(config.run.output, "relu1")
    assert table.column("index").to_pylist() == list(range(len(ids)))
    assert table.column("sample_id").to_pylist() == ids
    np.testing.assert_allclose(read_layer(config.run.output, "relu1"), _direct(config, images), rtol=1e-5, atol=1e-5)


def test_a_folder(tmp_path):
    names = [f"{'ab'[i % 2]}/{i:03d}.png" for i in range(21)]
    for i, name in enumerate(names):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / name).write_bytes(_png(i))
    config = _run(tmp_path, {"kind": "folder", "path": str(tmp_path / "images")})
    order = sorted(range(21), key=lambda i: names[i])
    _check(config, [names[i] for i in order], [_png(i) for i in order])
    assert read_table(config.run.output, "relu1").column("class_name").to_pylist() == [names[i][0] for i in order]
    assert (tmp_path / "out" / SOURCE_INDEX_PATH).is_file()


def test_parquet_categorical_columns_of_many_values(tmp_path):
    # pandas writes a categorical column of up to 127 values with int8 codes: a batch across two
    # such files held more values than int8 indices reach, and each try of its shard failed
    # ("a batch's columns differ from the file's first batch")
    (tmp_path / "pq").mkdir()
    names = [f"f{i // 100}-c{i % 100}" for i in range(200)]
    for f in range(2):
        rows = range(f * 100, f * 100 + 100)
        column = pa.DictionaryArray.from_arrays(pa.array(range(100), pa.int8()), pa.array([names[i] for i in rows]))
        pq.write_table(pa.table({"image": pa.array([_png(i) for i in rows], pa.binary()), "name": column}),
                       tmp_path / "pq" / f"part-{f}.parquet")
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1"]},
                               "source": {"kind": "parquet", "path": str(tmp_path / "pq")}, "dump": {"dtype": "float32"},
                               "run": {"output": str(tmp_path / "out"), "executor": "local", "actors": 1,
                                       "batch_size": 200, "shard_size": 200}})
    assert run(config, stream=None).bad == []
    _check(config, [str(i) for i in range(200)], [_png(i) for i in range(200)])
    table = read_table(config.run.output, "relu1")
    assert table.column("name").to_pylist() == names and table.schema.field("name").type == pa.string()


def test_webdataset_shards(tmp_path):
    (tmp_path / "wds").mkdir()
    keys = []
    for t in range(3):
        with tarfile.open(tmp_path / "wds" / f"part-{t}.tar", "w") as tar:
            for j in range(7):
                i = t * 7 + j
                keys.append(f"s{i:03d}")
                for ext, data in (("png", _png(i)), ("cls", str(i % 5).encode())):
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    config = _run(tmp_path, {"kind": "webdataset", "path": str(tmp_path / "wds" / "part-{0..2}.tar")})
    _check(config, keys, [_png(i) for i in range(21)])
    assert read_table(config.run.output, "relu1").column("label").to_pylist() == [i % 5 for i in range(21)]


def test_a_changed_source_is_refused_naming_where_it_first_differs(tmp_path):
    from pipeline.errors import OutputConflictError

    (tmp_path / "wds").mkdir()
    for t in range(2):
        with tarfile.open(tmp_path / "wds" / f"part-{t}.tar", "w") as tar:
            for i in range(t * 5, t * 5 + 5):
                data = _png(i)
                info = tarfile.TarInfo(f"s{i:03d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = {"kind": "webdataset", "path": str(tmp_path / "wds" / "part-*.tar")}
    config = _run(tmp_path, source)
    with tarfile.open(tmp_path / "wds" / "part-1.tar") as tar:  # sample 7 rewritten with another image
        members = [(m, tar.extractfile(m).read()) for m in tar]
    flat = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(flat, format="PNG")
    with tarfile.open(tmp_path / "wds" / "part-1.tar", "w") as tar:
        for member, data in members:
            data = flat.getvalue() if member.name == "s007.png" else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(OutputConflictError) as refused:
        run(config, stream=None)
    message = str(refused.value)
    assert "the source has changed since" in message and "another run" not in message
    assert "the first difference, sample 7: {'tar': '" in message and "part-1.tar', 'key': 's007'" in message


def test_parquet_on_object_storage(tmp_path, s3):
    from support.storage import upload

    (tmp_path / "table").mkdir()
    for f in range(3):
        rows = range(f * 7, f * 7 + 7)
        pq.write_table(pa.table({"image": [_png(i) for i in rows], "key": [f"k{i}" for i in rows]}),
                       tmp_path / "table" / f"{f}.parquet", row_group_size=3)
    upload(tmp_path / "table", f"s3://data/table?{s3}")
    config = _run(tmp_path, {"kind": "parquet", "path": f"s3://data/table?{s3}", "id_column": "key"})
    _check(config, [f"k{i}" for i in range(21)], [_png(i) for i in range(21)])


@pytest.mark.parametrize("kind", ["folder", "webdataset"])
def test_a_source_on_object_storage_written_to_object_storage(tmp_path, s3, kind):
    from support.storage import upload

    (tmp_path / "src").mkdir()
    if kind == "folder":
        for i in range(10):
            (tmp_path / "src" / f"{i:02d}.png").write_bytes(_png(i))
        path = f"s3://data/src?{s3}"
    else:
        with tarfile.open(tmp_path / "src" / "a.tar", "w") as tar:
            for i in range(10):
                info = tarfile.TarInfo(f"{i:02d}.png")
                info.size = len(_png(i))
                tar.addfile(info, io.BytesIO(_png(i)))
        path = f"s3://data/src/a.tar?{s3}"
    upload(tmp_path / "src", f"s3://data/src?{s3}")
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1"]},
                               "source": {"kind": kind, "path": path}, "dump": {"dtype": "float32"},
                               "run": {"output": f"s3://dumps/{kind}?{s3}", "executor": "local",
                                       "batch_size": 4, "shard_size": 4}})
    assert run(config, stream=None).rows == {"relu1": 10}
    ids = [f"{i:02d}.png" if kind == "folder" else f"{i:02d}" for i in range(10)]
    _check(config, ids, [_png(i) for i in range(10)])


def test_credentials_in_source_uris_are_used_but_not_stored(tmp_path, s3):
    """Keys in the URIs (``s3://KEY:SECRET@bucket/...``) open the source, and appear neither in
    the manifest nor in the WebDataset index the workers read the tars' names from."""
    from support.storage import upload

    (tmp_path / "src").mkdir()
    with tarfile.open(tmp_path / "src" / "a.tar", "w") as tar:
        for i in range(6):
            info = tarfile.TarInfo(f"{i:02d}.png")
            info.size = len(_png(i))
            tar.addfile(info, io.BytesIO(_png(i)))
    upload(tmp_path / "src", f"s3://data/src?{s3}")
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1"]},
                               "source": {"kind": "webdataset", "path": f"s3://test:topsecret@data/src/*.tar?{s3}"},
                               "dump": {"dtype": "float32"},
                               "run": {"output": str(tmp_path / "out"), "executor": "local", "actors": 2,
                                       "batch_size": 2, "shard_size": 2}})
    assert run(config, stream=None).rows == {"relu1": 6}
    _check(config, [f"{i:02d}" for i in range(6)], [_png(i) for i in range(6)])
    stored = [p for p in (tmp_path / "out" / "_actmap").rglob("*") if p.is_file()]
    assert stored and not [p for p in stored if b"topsecret" in p.read_bytes()]
    assert "s3://data/src/*.tar?" in (tmp_path / "out" / "_actmap" / "manifest.json").read_text()
    assert run(config, stream=None).resumed == 3  # the rerun's manifest matches the stored one


def test_a_dataset_whose_first_item_is_bad_and_a_later_label_has_another_type(tmp_path):
    """A lenient run goes on past both: item 0 raises, item 9's score is text in a column of
    floats; each is a bad sample with its reason, every other item is written."""
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1"]},
                               "source": {"kind": "dataset", "target": "support.datasets:Scored",
                                          "kwargs": {"n": 12, "bad": 0, "text_at": 9}},
                               "run": {"output": str(tmp_path / "out"), "executor": "local", "batch_size": 4,
                                       "shard_size": 8}})
    summary = run(config, stream=None)
    assert [(b["index"], b["reason"]) for b in summary.bad] == [
        (0, "ValueError: item 0 is corrupt"), (9, "label 'score' holds 'high' (type str); its column holds double")]
    table = read_table(config.run.output, "relu1")
    assert table.column("index").to_pylist() == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11]
    assert table.column("score").to_pylist() == [1.5, 2, 3.5, 4, 5.5, 6, 7.5, 8, 10, 11.5]


def test_a_dataset_label_that_first_appears_after_the_typed_items_is_left_out(tmp_path, caplog):
    """The label columns are those of the first items; a key that appears only later is not
    stored (with a warning naming it), and no shard fails on it; a missing one is a null, even
    in the first sample of a batch."""
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1"]},
                               "source": {"kind": "dataset", "target": "support.datasets:LateKey",
                                          "kwargs": {"n": 12, "late_from": 9, "missing": 8}},
                               "run": {"output": str(tmp_path / "out"), "executor": "local", "batch_size": 4,
                                       "shard_size": 8}})
    with caplog.at_level("WARNING", logger="pipeline"):
        summary = run(config, stream=None)
    assert summary.rows == {"relu1": 12} and not summary.bad
    table = read_table(config.run.output, "relu1")
    assert "late" not in table.column_names
    assert table.column("score").to_pylist() == [float(i) if i != 8 else None for i in range(12)]
    assert any("'late'" in r.getMessage() and "the first 8 readable ones" in r.getMessage() for r in caplog.records)


def test_a_dump_reads_row_groups_larger_than_its_shards_about_once(tmp_path, monkeypatch):
    # Parquet cannot start a read inside a row group: a worker keeps its read for its next shard,
    # which the driver takes from the same lane's run of consecutive shards: about 1.5 times the
    # table's rows are read in all. Dealt out in plain order, a worker's next shard lay a few
    # shards on, whose rows it read again: 4 to 5 times
    groups, rows = 16, 1024
    table = pa.table({"image": pa.array([_png(0)] * (groups * rows), pa.binary()),
                      "key": [f"k{i}" for i in range(groups * rows)]})
    (tmp_path / "table").mkdir()
    pq.write_table(table, tmp_path / "table" / "one.parquet", row_group_size=rows)
    read: list[int] = []
    batches = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in batches(self, *args, **kwargs):
            if "image" in batch.schema.names:  # not the driver's look for repeated ids
                read.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    config = Config.from_dict({"model": {"name": "support.models:tiny", "layers": ["relu1"]},
                               "source": {"kind": "parquet", "path": str(tmp_path / "table"), "id_column": "key"},
                               "run": {"output": str(tmp_path / "out"), "executor": "local", "actors": 4,
                                       "batch_size": 64, "shard_size": 64}})
    summary = run(config, stream=None)
    assert summary.bad == [] and summary.samples == len(table)
    assert sum(read) < 2 * len(table), sum(read) / len(table)
    assert read_table(config.run.output, "relu1").column("sample_id").to_pylist() == table.column("key").to_pylist()


def test_parquet_lists_and_structs_whose_files_hold_nulls_or_other_fields(tmp_path):
    # a column of empty lists (list<null>, as pandas types it) beside list<string> was refused;
    # a struct of other fields is a struct of both, null in the fields a file lacks
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": [_png(i) for i in range(6)], "tags": pa.array([[]] * 6),
                             "t": pa.array([{"y": i} for i in range(6)], pa.struct([("y", pa.int32())]))}),
                   tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"image": [_png(i) for i in range(6, 12)], "tags": [["cat"]] * 6,
                             "t": [{"z": f"z{i}"} for i in range(6, 12)]}), tmp_path / "pq" / "b.parquet")
    config = _run(tmp_path, {"kind": "parquet", "path": str(tmp_path / "pq")})
    _check(config, [str(i) for i in range(12)], [_png(i) for i in range(12)])
    table = read_table(config.run.output, "relu1")
    assert table.schema.field("t").type == pa.struct([("y", pa.int32()), ("z", pa.string())])
    assert table.column("tags").to_pylist() == [[]] * 6 + [["cat"]] * 6
    assert table.column("t").to_pylist() == ([{"y": i, "z": None} for i in range(6)]
                                             + [{"y": None, "z": f"z{i}"} for i in range(6, 12)])


@pytest.mark.parametrize("begun", ["now", "before the schemas were kept"])
def test_a_parquet_column_whose_type_changed_in_a_later_file_is_a_changed_source(tmp_path, begun):
    # only the first file's schema was in the source's identity: the rerun resumed with the old
    # type of n, and the rows it redid from b.parquet (int64 values over 2**31) were bad samples
    import json

    from pipeline._layout import MANIFEST_PATH
    from pipeline.errors import OutputConflictError

    (tmp_path / "pq").mkdir()

    def write(b_type, offset):
        pq.write_table(pa.table({"image": [_png(i) for i in range(8)], "n": pa.array(range(8), pa.int32())}),
                       tmp_path / "pq" / "a.parquet")
        pq.write_table(pa.table({"image": [_png(i) for i in range(8, 16)],
                                 "n": pa.array([offset + i for i in range(8, 16)], b_type)}), tmp_path / "pq" / "b.parquet")

    write(pa.int32(), 0)
    config = _run(tmp_path, {"kind": "parquet", "path": str(tmp_path / "pq")})
    if begun != "now":  # a manifest of a version whose identity did not keep the other files' schemas
        manifest = tmp_path / "out" / MANIFEST_PATH
        doc = json.loads(manifest.read_text())
        del doc["source"]["schemas_sha256"]
        manifest.write_text(json.dumps(doc))
        assert run(config, stream=None).new_samples == 0  # (it resumes while nothing changed)
    write(pa.int64(), 2 ** 40)
    with pytest.raises(OutputConflictError) as refused:
        run(config, stream=None)
    message = str(refused.value)
    if begun != "now":  # judged by the column types its index kept
        assert "source: the columns' types (the fields of the index the dump began with differ" in message
        return
    assert "the source has changed since" in message and "source: schemas_sha256: null -> " in message
    assert "the first difference, the facts the index keeps: the columns' types (fields)" in message  # (the output type of n)
