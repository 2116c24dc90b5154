"""Smoke tests of the CPU benchmarks: each main runs with the tiniest settings and returns a
table with the expected rows and positive rates (the figures themselves are not checked)."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str):
    # by plain name, so the raw-forward processes (spawned) can import it too
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_bench_encoding_rows(tmp_path, capsys):
    bench = _bench("bench_encoding")
    rows = bench.main(["--batch", "2", "--repeats", "1", "--threads", "2", "--dir", str(tmp_path)])
    expected = [(kind, comp) for comp in ("none", "zstd") for kind in bench.ENCODINGS] + [(bench.RAW, "none")]
    assert [(r["encoding"], r["compression"]) for r in rows] == expected
    for r in rows:
        rates = [r[k] for k in bench.RATES if r[k] is not None]
        assert rates and all(x > 0 and math.isfinite(x) for x in rates), r
    assert rows[-1]["write_1"] > 0 and rows[-1]["read_1"] is None
    printed = capsys.readouterr().out
    assert "ratio to fixed_size_binary" in printed and "FixedShapeTensorArray float16" in printed
    assert list(tmp_path.iterdir()) == []  # its files are removed


def test_bench_encoding_rejects_unknown_encoding():
    bench = _bench("bench_encoding")
    with pytest.raises(ValueError, match="unknown encoding"):
        bench._encode("float8", None)


def test_bench_pipeline_rows(ray_cluster, tmp_path, capsys):
    bench = _bench("bench_pipeline")
    result = bench.main(["--count", "16", "--size", "32", "--batch", "8", "--actors", "1",
                         "--shard-size", "8", "--workdir", str(tmp_path)])
    rows = result["rows"]
    assert [r["run"] for r in rows] == [bench.RAW, bench.HOOKS, bench.HOST, bench.ACTMAP, bench.STEADY,
                                        bench.RAYDATA, bench.RECHECK]
    for r in rows:
        assert r["images_per_s"] > 0 and r["vs_raw"] > 0, r
        assert r["images"] == (8 if r["run"] == bench.STEADY else 16), r  # steady: the first shard left out
    assert rows[0]["vs_raw"] == 1.0
    b = result["breakdown"]
    assert b["shards"] == 2 and b["rows"] == {"layer3": 16, "layer4": 16}
    assert sum(b["fractions"].values()) == pytest.approx(1.0)
    assert all(v >= 0 for k, v in b["seconds"].items() if k != "other")
    printed = capsys.readouterr().out
    assert "x raw forward" in printed and "load wait" in printed
    assert list(tmp_path.iterdir()) == []  # the dumps are removed


def test_bench_sources_rows(tmp_path, capsys):
    bench = _bench("bench_sources")
    result = bench.main(["--rows", "120", "--files", "60", "--generated", "40", "--size", "16", "--threads", "2",
                         "--batch", "16", "--shard-size", "32", "--no-e2e", "--no-raydata", "--plan-files", "300",
                         "--alone-repeats", "2", "--workdir", str(tmp_path)])
    assert list(result["kinds"]) == ["parquet", "folder", "webdataset", "generated"]
    for kind, res in result["kinds"].items():
        for key in ("floor_1", "floor_2", "source_1", "source_2"):
            assert res[key] > 0 and math.isfinite(res[key]), (kind, key)
        assert res["source_2_two_shards"] > 0 and "source_1_two_shards" not in res, kind
        assert all(len(res["seconds_2"][side]) == 2 for side in ("floor", "source", "two_shards"))  # taking turns
    plan = result["plan"]
    assert plan["plan_count"] == plan["scandir_count"] == plan["pyarrow_count"] == 300
    printed = capsys.readouterr().out
    assert "source alone, 2 thread(s)" in printed and "2 threads, 2 shards at once" in printed and "planning a folder of 300 files" in printed


def test_the_start_up_swing_is_the_spread_of_what_lies_outside_the_shards_span():
    swing = _bench("bench_sources").start_up_swing
    runs = [{"seconds": 13.6, "busy_seconds": 2.1}, {"seconds": 15.3, "busy_seconds": 2.2},
            {"seconds": 13.7, "busy_seconds": 2.5}]
    assert swing(runs) == pytest.approx(13.1 - 11.2)


def test_bench_actor_cpu_rows(ray_cluster, tmp_path, capsys):
    bench = _bench("bench_actor_cpu")
    medians = bench.main(["--rows", "256", "--shard-size", "64", "--batch", "32", "--repeats", "1",
                          "--workdir", str(tmp_path)])
    assert list(medians) == ["plain", "ray"]
    for m in medians.values():
        assert m["span"] > 0 and m["cpu"] > 0, m
    printed = capsys.readouterr().out
    assert printed.count("µs/row") == 2 and "medians of 1" in printed


def test_bench_reader_rows(tmp_path, capsys):
    bench = _bench("bench_reader")
    rows = bench.main(["--rows", "96", "--shape", "4", "2", "2", "--row-group", "8", "--shard", "32",
                       "--batch", "16", "--window", "24", "--repeats", "1", "--dir", str(tmp_path)])
    assert [r["read"] for r in rows] == [bench.SEQUENTIAL, bench.BLOCK, bench.RANDOM]
    assert all(r["rows_per_s"] > 0 and math.isfinite(r["rows_per_s"]) for r in rows)
    assert rows[0]["vs_sequential"] == 1.0
    assert "vs sequential" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # its files are removed


def test_bench_stats_rows(tmp_path, capsys):
    bench = _bench("bench_stats")
    result = bench.main(["--jobs", "default dump", "--count", "8", "--batch", "4", "--repeats", "1",
                         "--batch-repeats", "1", "--dir", str(tmp_path)])
    (actor,) = result["actors"]
    assert actor["job"] == "default dump" and actor["rows_per_s_with"] > 0 and actor["rows_per_s_without"] > 0
    assert [b["shape"] for b in result["batches"]] == list(bench.BATCH_SHAPES)
    assert all(b["write_ms"] > 0 and b["stats_ms"] > 0 for b in result["batches"])
    assert "ValueStats.add against the writer" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # its files are removed


def test_bench_decode_threads_rows(capsys):
    bench = _bench("bench_decode_threads")
    rows = bench.main(["--threads", "2", "--small", "16", "--batches", "3"])
    assert [(r["images"], r["threads"]) for r in rows] == [("16x16", 1), ("16x16", 2), ("500x375", 1), ("500x375", 2)]
    assert all(r["fixed"] > 0 and r["tuned"] > 0 for r in rows)
    assert "found by trial" in capsys.readouterr().out


def test_bench_jpeg_rows(capsys):
    bench = _bench("bench_jpeg")
    rows = bench.main(["--sizes", "16x8", "--pixels", "2000", "--repeats", "1"])
    assert [(r["size"], r["subsampling"]) for r in rows] == [
        ("16x8", "4:4:4"), ("16x8", "4:2:2"), ("16x8", "4:2:0"), ("16x8", "4:2:0 progressive")]
    assert all(r["same_pixels"] and r["simplejpeg_us"] > 0 and r["torchvision_us"] > 0 for r in rows)
    assert "same pixels: True" in capsys.readouterr().out


def test_bench_remote_rows(tmp_path):
    # in a process of its own: it starts a Ray whose actors inherit the store's credentials
    out = tmp_path / "remote.json"
    done = subprocess.run([sys.executable, str(BENCH / "bench_remote.py"), "--rows", "600", "--repeats", "1",
                           "--latency-ms", "5", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == ["S3, 5 ms a request, 1", "S3, 5 ms a request, 2", "local disk, 1", "local disk, 2"]
    for name, found in runs.items():
        assert found["rows_per_s"] > 0 and [r["rows"] for r in found["runs"]] == [600], name
    assert "x one at a time" in done.stdout
