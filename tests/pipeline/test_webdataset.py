"""WebDataset tar shards: grouping by key, side files, patterns, remote tars, shard reads."""

import pyarrow as pa
import pytest

from pipeline.errors import ConfigError
from pipeline._sources import BadSample, IndexFile, Sample, WebDatasetSource, write_index
from pipeline._store import OutputStore
from support.webdataset import write_shards


def test_samples_are_grouped_by_key_with_their_side_files(tmp_path):
    folder = write_shards(tmp_path / "wds", broken={5})
    source = WebDatasetSource(str(folder / "train-{0000..0002}.tar"))
    assert len(source) == 12 and len(source.tars) == 3
    fields = {f.name: f.type for f in source.label_fields()}
    assert fields == {"label": pa.int64(), "caption": pa.string(), "score": pa.float64(),
                      "tags": pa.string(), "ok": pa.bool_()}
    samples = list(source.stream(0, 12))
    assert [s.sample_id for s in samples] == [f"sample{i:05d}" for i in range(12)]
    assert [s.index for s in samples] == list(range(12))
    assert isinstance(samples[5], BadSample) and "no image member (members: cls, json, txt" in samples[5].reason
    good = samples[7]
    assert isinstance(good, Sample) and good.image[:3] == b"\xff\xd8\xff"
    assert good.labels == {"label": 1, "caption": "caption 7", "score": 3.5, "tags": '["a", 7]', "ok": False}
    assert samples[8].image[:4] == b"\x89PNG"


def test_patterns_globs_and_lists_name_the_same_tars(tmp_path):
    folder = write_shards(tmp_path / "wds")
    by_brace = WebDatasetSource(str(folder / "train-{0000..0002}.tar"))
    by_glob = WebDatasetSource(str(folder / "train-*.tar"))
    by_list = WebDatasetSource([str(folder / f"train-{i:04d}.tar") for i in range(3)])
    assert by_brace.identity()["index_sha256"] == by_list.identity()["index_sha256"]
    assert by_glob.tars == by_list.tars
    assert [s.sample_id for s in by_glob.read([11, 0])] == ["sample00011", "sample00000"]


def test_a_shard_reads_one_range_per_tar(tmp_path, monkeypatch):
    from pipeline._sources._files import Location

    folder = write_shards(tmp_path / "wds", shards=2, per_shard=50)
    source = WebDatasetSource(str(folder / "train-*.tar"))
    reads = []
    original = Location.read_range
    monkeypatch.setattr(Location, "read_range", lambda self, name, offset, size: (
        reads.append((name, offset, size)), original(self, name, offset, size))[1])
    samples = list(source.stream(30, 80))
    assert [s.index for s in samples] == list(range(30, 80))
    assert [name for name, _, _ in reads] == ["train-0000.tar", "train-0001.tar"]
    tar_size = (folder / "train-0000.tar").stat().st_size
    assert reads[0][2] < 0.5 * tar_size  # 20 of its 50 samples


def test_actors_read_the_drivers_index(tmp_path):
    folder = write_shards(tmp_path / "wds")
    driver = WebDatasetSource(str(folder / "train-*.tar"))
    store = OutputStore(str(tmp_path / "out"))
    store.make_dirs("_actmap")
    write_index(store.fs, store.path("_actmap/index.parquet"), driver.index)
    actor = WebDatasetSource(str(folder / "train-*.tar"), index=IndexFile(store.fs, store.path("_actmap/index.parquet")))
    assert actor.identity() == driver.identity()
    assert actor.label_fields() == driver.label_fields()
    assert [(s.sample_id, s.labels) for s in actor.stream(2, 9)] == [(s.sample_id, s.labels) for s in driver.stream(2, 9)]


def test_remote_tars(tmp_path, s3):
    from support.storage import upload

    folder = write_shards(tmp_path / "wds")
    upload(folder, f"s3://data/wds?{s3}")
    remote = WebDatasetSource(f"s3://data/wds/train-{{0000..0002}}.tar?{s3}")
    local = WebDatasetSource(str(folder / "train-{0000..0002}.tar"))
    assert len(remote) == len(local)
    assert [(s.sample_id, s.image, s.labels) for s in remote.stream(1, 11)] == \
        [(s.sample_id, s.image, s.labels) for s in local.stream(1, 11)]


def test_errors_name_the_bad_pattern(tmp_path):
    with pytest.raises(ConfigError, match="matches no file"):
        WebDatasetSource(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ConfigError, match="cannot read the tar"):
        WebDatasetSource(str(tmp_path / "bad.tar"))
    with pytest.raises(ConfigError, match="cannot read the tar"):
        WebDatasetSource(str(tmp_path / "missing.tar"))


def test_remote_glob(tmp_path, s3):
    from support.storage import upload

    upload(write_shards(tmp_path / "wds"), f"s3://data/wds?{s3}")
    assert len(WebDatasetSource(f"s3://data/wds/train-*.tar?{s3}")) == 12


def test_members_no_column_uses_are_not_read(tmp_path, monkeypatch):
    import io
    import tarfile

    from pipeline._sources._files import Location

    big = b"\0" * (4 << 20)
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i in range(3):
            for name, data in ((f"{i}.png", b"\x89PNG fake"), (f"{i}.mp4", big), (f"{i}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = WebDatasetSource(str(tmp_path / "a.tar"))
    sizes = []
    original = Location.read_range
    monkeypatch.setattr(Location, "read_range", lambda self, name, offset, size: (
        sizes.append(size), original(self, name, offset, size))[1])
    samples = list(source.stream(0, 3))
    assert [s.labels["label"] for s in samples] == [1, 1, 1] and samples[2].image == b"\x89PNG fake"
    assert sum(sizes) < 10_000  # the images and .cls files, not the 4 MB videos between them
