"""Dumps written by actmap 0.1.0 (tests/pipeline/fixtures/dump-0.1.0) read with today's readers.

The fixture is never regenerated: it pins the format on disk. The values are checked against a
plain forward of the same model on the same inputs, so a reader that decodes the bytes wrongly
fails here even when it agrees with today's writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import ActivationDataset, inspect_dump, read_layer, read_table
from pipeline._images import decode
from pipeline._preprocess import to_model_input
from pipeline._sources.generated import generate
from support.models import tiny

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dump-0.1.0"
GENERATED, VARIABLE = str(FIXTURE / "generated"), str(FIXTURE / "variable")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# the PNG sizes (w, h) of images/0.png .. 4.png; 5.png is not an image
SIZES = [(8, 6), (10, 10), (8, 6), (7, 9), (12, 8)]


def _layers(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """relu1 and conv2 of the tiny model as the dump built it (seed 0), on a uint8 batch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny().eval()
    with torch.no_grad():
        relu1 = model.relu1(model.conv1(to_model_input(x, IMAGENET)))
        return {"relu1": relu1, "conv2": model.conv2(relu1)}


def _generated_images() -> tuple[torch.Tensor, list[int], list[np.ndarray]]:
    items = [generate(i, 8, 0) for i in range(30)]
    return torch.stack([i[0] for i in items]), [i[1] for i in items], [i[2] for i in items]


def test_generated_dump_reads_back():
    images, labels, masks = _generated_images()
    expected = _layers(images)
    for layer, shape in (("relu1", (30, 8, 8, 8)), ("conv2", (30, 16, 4, 4))):
        values = read_layer(GENERATED, layer)
        assert values.shape == shape and values.dtype == np.float16
        np.testing.assert_allclose(values, expected[layer].numpy(), rtol=1e-3, atol=1e-3)
        assert np.array_equal(read_layer(GENERATED, layer, start=9, stop=17), values[9:17])
    table = read_table(GENERATED, "conv2")
    assert table.column_names == ["sample_id", "index", "activation", "label", "mask"]
    assert table.column("index").to_pylist() == list(range(30))
    assert table.column("sample_id").to_pylist() == [str(i) for i in range(30)]
    assert table.column("label").to_pylist() == labels


def test_generated_dump_as_a_torch_dataset():
    images, labels, masks = _generated_images()
    expected = _layers(images)["relu1"]
    data = ActivationDataset(GENERATED, "relu1", cache_row_groups=2)
    assert len(data) == 30
    for i in (0, 7, 8, 29):
        activation, row = data[i]
        assert activation.dtype == torch.float32 and activation.shape == (8, 8, 8)
        np.testing.assert_allclose(activation.numpy(), expected[i].numpy(), rtol=1e-3, atol=1e-3)
        assert row["index"] == i and row["sample_id"] == str(i) and row["label"] == labels[i]
        assert torch.equal(row["mask"], torch.from_numpy(masks[i]))


def test_generated_dump_inspected():
    info = inspect_dump(GENERATED)
    assert info.complete and (info.shards_done, info.shards_planned) == (4, 4)
    assert info.bad == []
    assert {k: (v["rows"], v["shape"], v["dtype"], v["files"]) for k, v in info.layers.items()} == {
        "conv2": (30, [16, 4, 4], "float16", 4), "relu1": (30, [8, 8, 8], "float16", 4)}
    text = info.format()
    assert "model: support.models:tiny (weights " in text and "source: generated of 30 samples" in text
    assert "shards: 4/4 done, complete" in text
    assert "layer relu1: 30 rows of 8x8x8 float16, 0.0 MB, 4 files, columns: sample_id, index" in text


def _png_layers() -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(len(SIZES)):
        image = decode((FIXTURE / "images" / f"{i}.png").read_bytes())
        out.append({k: v[0] for k, v in _layers(image[None]).items()})
    return out


def test_variable_dump_reads_back():
    expected = _png_layers()
    for layer in ("relu1", "conv2"):
        values = read_layer(VARIABLE, layer)
        assert isinstance(values, list) and len(values) == 5
        for got, want in zip(values, expected):
            assert got.dtype == np.float32 and got.shape == tuple(want[layer].shape)
            # stored as bfloat16: 8 bits of mantissa
            np.testing.assert_allclose(got, want[layer].numpy(), rtol=1e-2, atol=1e-2)
        as_torch = read_layer(VARIABLE, layer, as_torch=True)
        assert as_torch[0].dtype == torch.bfloat16
    assert [a.shape[1:] for a in read_layer(VARIABLE, "relu1")] == [(h, w) for w, h in SIZES]
    table = read_table(VARIABLE, "relu1")
    assert table.column("sample_id").to_pylist() == [f"{i}.png" for i in range(5)]
    assert "activation_shape" in table.column_names


def test_variable_dump_as_a_torch_dataset_and_inspected():
    expected = _png_layers()
    data = ActivationDataset(VARIABLE, "conv2", dtype=None)
    assert len(data) == 5
    activation, row = data[3]
    assert activation.dtype == torch.bfloat16 and row["sample_id"] == "3.png"
    assert "activation_shape" not in row
    np.testing.assert_allclose(activation.float().numpy(), expected[3]["conv2"].numpy(), rtol=1e-2, atol=1e-2)
    info = inspect_dump(VARIABLE)
    assert info.complete and info.layers["relu1"]["shape"] is None
    assert [b["sample_id"] for b in info.bad] == ["5.png"]
    assert "layer relu1: 5 rows of variable bfloat16, 0.0 MB, 2 files" in info.format()


@pytest.mark.parametrize("location", [GENERATED, VARIABLE])
def test_fixture_holds_no_temporary_files(location):
    assert not [p for p in Path(location).rglob(".*")]
