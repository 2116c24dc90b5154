"""WebDataset tar shards: grouping by key, side files, patterns, remote tars, shard reads."""

import re

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
    # a tar may end without its blocks of zeros, right after its last member
    last = folder / "train-0002.tar"
    end = max(m.offset_data + -(-m.size // 512) * 512 for m in __import__("tarfile").open(last))
    last.write_bytes(last.read_bytes()[:end])
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


def _tar(path, members, **options):
    """A tar of ``(name, bytes)`` files, ``(name, "->", target)`` hard links and ``(name, "~>",
    target)`` symbolic links, in order."""
    import io
    import tarfile

    with tarfile.open(path, "w", **options) as tar:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            if rest[0] in ("->", "~>"):
                info.type, info.linkname = tarfile.LNKTYPE if rest[0] == "->" else tarfile.SYMTYPE, rest[1]
                tar.addfile(info)
            else:
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
    return path


def test_json_fields_are_those_of_every_member_and_label_caption_pass_where_no_side_file_gives_them(tmp_path, caplog):
    import json

    png = b"\x89PNG fake"
    docs = [{"label": 3, "caption": "x"}, {}, {"bbox": [1, 2], "n": 1, "gone": None}, {"n": 2.5, "label": 4}]
    tar = _tar(tmp_path / "a.tar", [m for i, doc in enumerate(docs)
                                    for m in ((f"k{i}.png", png), (f"k{i}.json", json.dumps(doc).encode()))])
    source = WebDatasetSource(str(tar))
    assert {f.name: f.type for f in source.label_fields()} == {
        "label": pa.int64(), "caption": pa.string(), "bbox": pa.string(), "n": pa.float64(), "gone": pa.string()}
    rows = [s.labels for s in source.stream(0, 4)]
    assert rows[2] == {"label": None, "caption": None, "bbox": "[1, 2]", "n": 1, "gone": None}
    assert rows[3]["n"] == 2.5 and rows[3]["label"] == 4 and rows[0]["caption"] == "x"
    # where .cls files give the label, the .json field of that name is not passed through, and says why
    with_cls = _tar(tmp_path / "b.tar", [("k0.png", png), ("k0.cls", b"7"), ("k0.json", b'{"label": 1, "sample_id": 2}')])
    source = WebDatasetSource(str(with_cls))
    assert [f.name for f in source.label_fields()] == ["label"]
    assert next(source.stream(0, 1)).labels == {"label": 7}
    assert "the .cls files give that column" in caplog.text and "every dump has that column" in caplog.text


def test_a_tar_cut_short_says_where_and_what_to_do(tmp_path):
    # a partial download was refused with tarfile's bare "unexpected end of data"
    tar = _tar(tmp_path / "a.tar", [(f"s{i}.png", b"\x89PNG" + bytes(3000)) for i in range(3)])
    import tarfile

    with tarfile.open(tar) as whole:
        cut = whole.getmembers()[-1].offset_data + 1000  # inside the last member's data
    with open(tar, "r+b") as handle:
        handle.truncate(cut)
    with pytest.raises(ConfigError, match=rf"cannot read the tar '.*a.tar': unexpected end of data: it ends inside a "
                                          rf"member, at byte {cut:,}, as a tar cut short does .*: fetch it again, or "
                                          r"leave it out of source.path"):
        WebDatasetSource(str(tar))


def test_a_sample_of_several_images_gives_the_first_in_a_fixed_order(tmp_path, caplog):
    # a photo .jpg and a mask .png per sample: the member first in the tar was taken, the photo
    # for some samples and the mask for others, without a word
    jpeg, png = b"\xff\xd8\xff photo", b"\x89PNG mask"
    tar = _tar(tmp_path / "a.tar", [("s0.jpg", jpeg), ("s0.png", png), ("s1.png", png), ("s1.jpg", jpeg),
                                    ("s2.png", png), ("s2.cls", b"1")])
    source = WebDatasetSource(str(tar))
    assert [s.image for s in source.stream(0, 3)] == [jpeg, jpeg, png]
    assert "2 sample(s) hold more than one image member (e.g. 's0'): each gives the first of them in the order " \
           "jpg, jpeg, png" in caplog.text
    assert source.identity()["image_member"].startswith("the first in the order jpg, jpeg, png")
    plain = WebDatasetSource(str(_tar(tmp_path / "b.tar", [("s0.jpg", jpeg), ("s1.png", png)])))
    assert "image_member" not in plain.identity()  # (dumps begun before resume as they did)


def test_the_image_member_can_be_chosen_by_its_extensions(tmp_path, caplog):
    # a photo and a mask per sample, as segmentation sets ship: the config says which is the image
    from pipeline._sources import open_source
    from pipeline.config import SourceSpec

    jpeg, png, seg = b"\xff\xd8\xff photo", b"\x89PNG mask", b"\x89PNG seg"
    tar = _tar(tmp_path / "a.tar", [("s0.jpg", jpeg), ("s0.seg.png", seg), ("s0.png", png), ("s0.cls", b"3"),
                                    ("s1.seg.png", seg), ("s1.jpg", jpeg), ("s2.jpg", jpeg)])

    def images(**source):
        opened = open_source(SourceSpec.from_dict({"kind": "webdataset", "path": str(tar), **source}))
        return [getattr(s, "image", None) or s.reason for s in opened.stream(0, len(opened))], opened

    assert images()[0] == [jpeg, jpeg, jpeg]
    chosen, source = images(image_extensions="seg.png;png")  # WebDataset's spelling
    assert chosen[:2] == [seg, seg]
    assert chosen[2] == "no image member (members: jpg; looked for seg.png, png)"
    assert "1 sample(s) hold more than one image member (e.g. 's0'): each gives the first of them in the order " \
           "seg.png, png (source.image_extensions chooses)" in caplog.text
    assert source.identity()["image_member"] == "the first in the order seg.png, png"
    assert images(image_extensions=[".PNG", "jpg"])[0] == [png, jpeg, jpeg]
    assert [list(s.labels.values()) for s in images(image_extensions=["png"])[1].stream(0, 1)] == [[3]]
    with pytest.raises(ConfigError, match=r"source.image_extensions: no member of the tars has the extension "
                                          r"jpeg or webp; theirs: cls, jpg, png, seg.png"):
        images(image_extensions=["jpeg", "webp"])
    with pytest.raises(ConfigError, match=r"source.image_extensions: 'cls' is a side file's extension"):
        images(image_extensions=["jpg", "cls"])
    for bad in ("", [], ["jpg", ""], [3], ";"):
        with pytest.raises(ConfigError, match=r"source.image_extensions: expected file extensions in order of "
                                              r"preference, such as \[jpg, png\] or 'jpg;png', got"):
            images(image_extensions=bad)


def test_hard_links_strays_and_extensions_in_any_case(tmp_path, caplog):
    jpeg = b"\xff\xd8\xff fake"
    tar = _tar(tmp_path / "a.tar", [
        ("a.jpg", jpeg), ("a.CLS", b"2"), ("a.TXT", b"hi"),
        ("b.jpg", "->", "a.jpg"), ("b.cls", b"1"),
        ("c.jpg", "->", "a.jpg"),  # a sample of a link alone
        ("._c.jpg", b"mac"), ("dir/.hidden.png", b"x"), ("README", b"no extension"),
        ("caf\xe9.jpg", jpeg),  # a Latin-1 name: not UTF-8
        ("d.png", b"one"), ("d.png", b"two"), ("d.cls", b"0"),
    ], format=__import__("tarfile").GNU_FORMAT, encoding="latin-1")
    source = WebDatasetSource(str(tar))
    samples = list(source.stream(0, len(source)))
    assert [s.sample_id for s in samples] == ["a", "b", "c", "d"]
    assert [s.image for s in samples[:3]] == [jpeg] * 3
    assert [s.labels for s in samples[:3]] == [{"label": 2, "caption": "hi"}, {"label": 1, "caption": None},
                                               {"label": None, "caption": None}]
    assert isinstance(samples[3], BadSample) and "d.png more than once" in samples[3].reason
    assert "not UTF-8 and are left out" in caplog.text


def test_a_hard_link_to_a_member_before_the_shard_reads_that_member(tmp_path):
    # the link's member lies before the rest of the shard's read: it was sliced from the wrong
    # bytes, an empty image or, for a side file, a wrong label without a word
    png = b"\x89PNG fake"
    tar = _tar(tmp_path / "a.tar", [m for i in range(6) for m in (
        (f"s{i}.png", png + bytes([i])),
        (f"s{i}.cls", "->", "s0.cls") if i == 5 else (f"s{i}.cls", str(7 if i == 0 else i).encode()),
        (f"s{i}.txt", b"3" * 12_000 if i == 4 else b"caption"))])
    source = WebDatasetSource(str(tar))
    for size in (1, 2, 3, 6):
        samples = [s for start in range(0, 6, size) for s in source.stream(start, min(start + size, 6))]
        assert [s.labels["label"] for s in samples] == [7, 1, 2, 3, 4, 7], size
        assert [s.image for s in samples] == [png + bytes([i]) for i in range(6)], size


def test_a_damaged_header_is_an_error_not_the_end_of_the_tar(tmp_path):
    # tarfile ends a tar quietly at a header it cannot read: every sample after it was dropped
    folder = write_shards(tmp_path / "wds", shards=1, per_shard=10)
    tar = folder / "train-0000.tar"
    data = bytearray(tar.read_bytes())
    offsets = [m.offset for m in __import__("tarfile").open(tar)]
    data[offsets[5] + 148] ^= 0x01  # a checksum digit
    tar.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"cannot read the tar .*train-0000.tar': the header at byte "
                                          f"{offsets[5]:,} is damaged .*, so the 5 files before it"):
        WebDatasetSource(str(tar))


def test_a_tar_cut_inside_a_header_is_an_error_and_one_cut_between_members_is_said(tmp_path, caplog):
    # tarfile ends a tar quietly at a header cut short: the samples after the cut were dropped
    import tarfile

    tar = _tar(tmp_path / "a.tar", [(f"s{i}.{ext}", data) for i in range(4)
                                    for ext, data in (("png", b"\x89PNG" + bytes(600)), ("cls", b"1"))])
    headers = [m.offset for m in tarfile.open(tar)]
    whole = tar.read_bytes()
    tar.write_bytes(whole[:headers[4] + 100])  # inside the header of the third sample's image
    with pytest.raises(ConfigError, match=rf"'.*a.tar': it ends inside the header at byte {headers[4]:,}, 100 bytes into its "
                                          r"512, as a tar cut short does .*so the 4 files before it are all that could "
                                          r"be read: fetch it again, or leave it out of source.path"):
        WebDatasetSource(str(tar))
    tar.write_bytes(whole[:headers[4]])  # between two members: as a tar without its end-of-archive blocks
    assert len(WebDatasetSource(str(tar))) == 2
    assert ("a.tar ends without the end-of-archive blocks that tar writes after the last member: it may be cut short, "
            "after its 4 files") in caplog.text


def test_a_sparse_member_is_refused_not_read_as_it_lies(tmp_path):
    # (GNU tar --sparse stores a file without its holes: its bytes were read as the image, wrong)
    import io
    import tarfile

    def write(name, image_kind):
        with tarfile.open(tmp_path / name, "w", format=tarfile.GNU_FORMAT) as tar:
            for member, data, kind in (("s0.png", b"\x89PNG" + bytes(100), image_kind),
                                       ("s0.cls", b"1", tarfile.REGTYPE), ("s0.mp4", b"x", tarfile.GNUTYPE_SPARSE)):
                info = tarfile.TarInfo(member)
                info.size, info.type = len(data), kind
                tar.addfile(info, io.BytesIO(data))
        return str(tmp_path / name)

    with pytest.raises(ConfigError, match=r"a.tar': 1 member\(s\) are stored sparse \(tar --sparse, -S\), e.g. "
                                          r"'s0.png': .*archive the files again without --sparse"):
        WebDatasetSource(write("a.tar", tarfile.GNUTYPE_SPARSE))
    # a sparse member that is never read is indexed as before (its extension, the digest)
    assert WebDatasetSource(write("b.tar", tarfile.REGTYPE)).index.meta["extensions"] == ["cls", "mp4", "png"]


def test_tars_joined_by_cat_are_said_to_read_as_the_first(tmp_path, caplog):
    first = _tar(tmp_path / "a.tar", [("a.png", b"\x89PNG a")])
    second = _tar(tmp_path / "b.tar", [("b.png", b"\x89PNG b")])
    (tmp_path / "ab.tar").write_bytes(first.read_bytes() + second.read_bytes())
    assert len(WebDatasetSource(str(tmp_path / "ab.tar"))) == 1
    assert "ab.tar holds data after its end-of-archive blocks, from byte 10,240, which is not read" in caplog.text
    caplog.clear()
    assert len(WebDatasetSource([str(first), str(second)])) == 2 and "end-of-archive" not in caplog.text
    for name in ("cd.tar", "ef.tar"):  # said once however many tars
        (tmp_path / name).write_bytes(first.read_bytes() + second.read_bytes())
    WebDatasetSource(str(tmp_path / "*.tar"))
    assert caplog.text.count("end-of-archive") == 1 and "which is not read" in caplog.text
    assert "(so do 2 more tars)" in caplog.text


def test_symbolic_links_in_a_tar_are_named_with_what_to_do(tmp_path, caplog):
    png = b"\x89PNG fake"
    tar = _tar(tmp_path / "a.tar", [("a.png", png), ("b.png", "~>", "/data/b.png"), ("b.cls", b"1")])
    samples = list(WebDatasetSource(str(tar)).stream(0, 2))
    assert samples[0].image == png and isinstance(samples[1], BadSample)
    assert ("1 member(s) in a.tar are symbolic links, which hold no data in a tar, and are left out, e.g. "
            "'b.png -> /data/b.png'; archive the files they point to with tar --dereference (-h)") in caplog.text


def test_brace_patterns_nest_and_a_tar_named_twice_is_read_once(tmp_path, caplog, monkeypatch):
    from pipeline._sources.webdataset import expand_braces

    assert expand_braces("x{a,{b,c}}.tar") == ["xa.tar", "xb.tar", "xc.tar"]
    assert expand_braces("x-{3..1}.tar") == ["x-3.tar", "x-2.tar", "x-1.tar"]
    assert expand_braces("x-{8..010}.tar") == ["x-008.tar", "x-009.tar", "x-010.tar"]
    assert expand_braces("{x}-{1..}-{a,b.tar") == ["{x}-{1..}-{a,b.tar"]
    folder = write_shards(tmp_path / "wds")
    source = WebDatasetSource([str(folder / "train-*.tar"), str(folder / "train-0001.tar")])
    assert len(source.tars) == 3 and len(source) == 12
    assert "named more than once" in caplog.text
    # by any path to it
    monkeypatch.chdir(folder)
    source = WebDatasetSource(["train-*.tar", str(folder / "train-0001.tar"), "./train-0002.tar",
                               f"file://{folder}/train-0000.tar"])
    assert source.tars == [str(folder / f"train-000{i}.tar") for i in range(3)] and len(source) == 12
    # a file URI is percent-encoded: "%20" is the space of the plain path
    (folder / "a b.tar").write_bytes((folder / "train-0000.tar").read_bytes())
    source = WebDatasetSource([str(folder / "a b.tar"), f"file://{folder}/a%20b.tar"])
    assert len(source.tars) == 1 and len(source) == 4
    plain = [(s.sample_id, s.image) for s in WebDatasetSource([str(folder / "a b.tar")]).stream(0, 4)]
    assert [(s.sample_id, s.image) for s in WebDatasetSource([f"file://{folder}/a%20b.tar"]).stream(0, 4)] == plain


def test_the_same_tars_named_another_way_are_the_same_source(tmp_path, monkeypatch):
    # a rerun naming them by another path was refused: "the source has changed since"
    folder = write_shards(tmp_path / "wds")
    monkeypatch.chdir(tmp_path)
    spellings = ["wds/train-*.tar", str(folder / "train-*.tar"), f"file://{folder}/train-*.tar", "./wds//train-*.tar"]
    identities = [WebDatasetSource(path).identity() for path in spellings]
    assert all({**i, "earlier": None} == {**identities[1], "earlier": None} for i in identities)
    assert identities[1]["path"] == [str(folder / "train-*.tar")] and "earlier" not in identities[1]
    source = WebDatasetSource("wds/train-*.tar")  # its actors read the tars wherever they run
    assert source.index.meta["tars"] == [str(folder / f"train-000{i}.tar") for i in range(3)]
    # a pattern that starts with braces stays as spelled, not put below the working directory;
    # one of ranges, a short line however many tars it names
    pattern = "{%s,%s}" % (folder / "train-0000.tar", folder / "train-0001.tar")
    assert WebDatasetSource(pattern).identity()["path"] == [pattern]
    assert WebDatasetSource("wds/train-{0000..0002}.tar").identity()["path"] == [str(folder / "train-{0000..0002}.tar")]


def test_a_dump_begun_when_tars_were_kept_as_spelled_resumes(tmp_path, monkeypatch):
    # its identity held the patterns as spelled, its digest the tars as spelled
    from dataclasses import replace

    from pipeline._manifest import conflicts, new_manifest
    from pipeline._sources._index import digest
    from pipeline.config import Config

    folder = write_shards(tmp_path / "wds")
    monkeypatch.chdir(tmp_path)
    source = WebDatasetSource("wds/train-*.tar")
    meta = {k: v for k, v in source.index.meta.items() if k in ("extensions", "samples", "repeated_ids", "json_fields")}
    spelled = [f"wds/train-000{i}.tar" for i in range(3)]
    before = {"kind": "webdataset", "path": ["wds/train-*.tar"], "tars": 3, "samples": 12,
              "index_sha256": digest(source.index.table, {**meta, "tars": spelled})}
    new = new_manifest(Config(), {"weights_sha256": "x"}, source.identity(), 12)
    assert conflicts(replace(new, source=before), new) == []
    absolute = dict(before, path=[str(folder / "train-*.tar")],  # (begun by absolute paths: this run's are relative)
                    index_sha256=digest(source.index.table, {**meta, "tars": [str(tmp_path / t) for t in spelled]}))
    assert conflicts(replace(new, source=absolute), new) == []
    assert conflicts(replace(new, source=dict(before, samples=11)), new) == ["source: samples: 11 -> 12"]


def test_a_changed_source_is_named_where_it_changed_not_where_it_is_spelled_otherwise(tmp_path, monkeypatch):
    # a kept index whose tars were spelled relative, and whose facts came back from its file as
    # lists: every change was "at sample 0", and json_fields always differed
    import json

    from pipeline._sources import MemoryIndex
    from pipeline._sources._index import first_difference

    folder = write_shards(tmp_path / "wds")
    monkeypatch.chdir(tmp_path)
    now = WebDatasetSource(str(folder / "train-*.tar")).index
    kept = MemoryIndex(now.table, dict(json.loads(json.dumps(now.meta)), tars=[f"wds/train-000{i}.tar" for i in range(3)],
                                       sha256_as_spelled="x"))
    assert first_difference(kept, now) is None
    changed = MemoryIndex(now.table.slice(0, 11), now.meta)
    assert first_difference(kept, changed) == "sample 11 on: 1 row(s) before, none now"


def test_unreadable_tars_say_why(tmp_path):
    import gzip

    folder = write_shards(tmp_path / "wds")
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((folder / "train-0000.tar").read_bytes()))
    with pytest.raises(ConfigError, match="gzip-compressed; shards are read by byte range"):
        WebDatasetSource(str(tmp_path / "a.tar.gz"))
    for named in (folder, f"{folder}/"):  # the pattern to name is the folder's, in full
        with pytest.raises(ConfigError, match=re.escape(f"it is a folder; name its tar files ('{folder}/*.tar')")):
            WebDatasetSource(str(named))
    with pytest.raises(ConfigError, match="a glob matches file names, not folders"):
        WebDatasetSource(str(tmp_path / "w*" / "train-0000.tar"))


def test_repeated_keys_come_with_the_likely_cause(tmp_path):
    png = b"\x89PNG fake"
    tar = _tar(tmp_path / "a.tar", [("k0.png", png), ("k1.png", png), ("k0.cls", b"1")])
    assert "tar --sort=name" in WebDatasetSource(str(tar)).repeated_ids["hint"]


def test_a_folder_whose_name_has_glob_characters_is_read_as_named(tmp_path):
    folder = write_shards(tmp_path / "run[1]")
    assert len(WebDatasetSource(str(folder / "train-0000.tar"))) == 4
    assert len(WebDatasetSource(str(folder / "train-*.tar"))) == 12
    # and so is a tar: a name that is there is a name, not a glob
    (folder / "train-0000.tar").rename(folder / "train[0].tar")
    assert len(WebDatasetSource(str(folder / "train[0].tar"))) == 4
    assert len(WebDatasetSource(str(folder / "train[[]0].tar"))) == 4
    assert len(WebDatasetSource(str(folder / "train*.tar"))) == 12


def test_a_glob_leaves_out_hidden_files_as_a_shell_does(tmp_path):
    folder = write_shards(tmp_path / "wds")
    (folder / "._train-0000.tar").write_bytes(b"\x00\x05\x16\x07 a macOS resource fork")
    assert WebDatasetSource(str(folder / "*.tar")).tars == WebDatasetSource(str(folder / "train-*.tar")).tars
    with pytest.raises(ConfigError, match="cannot read the tar"):
        WebDatasetSource(str(folder / ".*.tar"))  # named by the pattern itself: taken
    with pytest.raises(ConfigError, match=r"matches no file: its files whose names start with '\.' are left out"):
        WebDatasetSource(str(folder / "*_train-0000.tar"))


def test_linked_json_members_on_object_storage(tmp_path, s3):
    from support.storage import upload

    (tmp_path / "src").mkdir()
    _tar(tmp_path / "src" / "a.tar", [("000.png", b"\x89PNG fake"), ("000.json", b'{"w": 4}'),
                                      ("001.png", "->", "000.png"), ("001.json", "->", "000.json")])
    _tar(tmp_path / "src" / "b.tar", [("meta.bin", b'{"h": 5}'), ("002.png", b"\x89PNG fake"),
                                      ("002.json", "->", "meta.bin")])  # a link to a file not named .json
    upload(tmp_path / "src", f"s3://data/src?{s3}")
    remote = WebDatasetSource(f"s3://data/src/*.tar?{s3}")
    samples = list(remote.stream(0, 4))
    assert isinstance(samples[2], BadSample) and samples[2].sample_id == "meta"  # no image: its own bad sample
    assert [(s.sample_id, s.labels) for s in samples[:2] + samples[3:]] == [
        ("000", {"w": 4, "h": None}), ("001", {"w": 4, "h": None}), ("002", {"w": None, "h": 5})]


def test_a_side_file_that_does_not_parse_makes_its_sample_bad_and_says_which(tmp_path):
    jpeg = b"\xff\xd8\xff fake"
    tar = _tar(tmp_path / "a.tar", [
        ("a.jpg", jpeg), ("a.txt", "café".encode()), ("a.cls", b"1"),
        ("b.jpg", jpeg), ("b.txt", "café".encode("latin-1")),  # not UTF-8: no character is guessed
        ("c.jpg", jpeg), ("c.cls", b"one"),
        ("d.jpg", jpeg), ("d.json", b"{not json"),
    ])
    samples = list(WebDatasetSource(str(tar)).stream(0, 4))
    assert samples[0].labels == {"label": 1, "caption": "café"}
    assert [(s.sample_id, s.reason.split(":")[0]) for s in samples[1:]] == [
        ("b", "its txt member is not UTF-8 text"), ("c", "its cls member is not an integer"),
        ("d", "its json member is not JSON")]
    assert "can't decode byte 0xe9" in samples[1].reason


def test_the_driver_holds_one_tar_of_headers_at_a_time_while_it_indexes(tmp_path):
    # the members of every tar, as Python objects, took the driver's memory with the number of
    # samples (tarfile keeps each header it reads; the rows were dicts until the end)
    import tracemalloc

    def peak(folder) -> int:
        tracemalloc.start()
        try:
            WebDatasetSource(str(folder / "train-*.tar"))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    one = peak(write_shards(tmp_path / "one", shards=1, per_shard=300))
    eight = peak(write_shards(tmp_path / "eight", shards=8, per_shard=300))
    assert eight < 2 * one, (one, eight)


def test_tars_on_a_network_file_system_are_indexed_several_at_a_time(tmp_path, monkeypatch):
    # each header read waits on the network there, as on object storage; on a local disk one
    # thread is fastest (the threads only contend for the interpreter)
    import concurrent.futures

    from pipeline._sources import webdataset
    from support.storage import on_network_mount

    threads: list[int] = []

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, workers: int):
            threads.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(webdataset, "ThreadPoolExecutor", Pool)
    folder = write_shards(tmp_path / "wds", shards=4)
    local = WebDatasetSource(str(folder / "train-*.tar"))
    on_network_mount(monkeypatch, folder, "nfs4")
    on_nfs = WebDatasetSource(str(folder / "train-*.tar"))
    assert threads == [1, 4]
    assert on_nfs.identity() == local.identity()
