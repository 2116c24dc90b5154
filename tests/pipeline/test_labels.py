"""Label values against their columns' types: one that does not fit makes its sample bad."""

import datetime

import numpy as np
import pyarrow as pa
import pytest

from pipeline._labels import label_problem, split_unfit
from pipeline._records import BadSample
from pipeline._sources import Sample


_BOX = pa.struct([("x", pa.int64()), ("y", pa.int64())])

FITTING = [
    (3, pa.int64()), (3, pa.int32()), (np.int16(3), pa.int64()), (3, pa.float64()), (2.5, pa.float32()),
    (True, pa.bool_()), ("cat", pa.string()), ("cat", pa.large_string()), (b"\x00", pa.binary()),
    (None, pa.int64()), (None, pa.string()), ([1, 2], pa.list_(pa.int64())),
    (datetime.date(2026, 1, 2), pa.date32()),
    ({"x": 1, "y": 2.5}, pa.struct([("x", pa.int64()), ("y", pa.float64())])), ({"x": 1}, _BOX),
    ([[1, 2.5], []], pa.list_(pa.list_(pa.float64()))), ((1, 2), pa.list_(pa.int64())),
    (np.arange(2), pa.list_(pa.int64())), ([{"x": 1, "y": None}], pa.list_(_BOX)),
    # inside lists and dicts a value fits where the column holds it as it is: a whole float in an
    # integer field, a numpy bool, NaN and -0.0, a float at a column's lower precision, a
    # tuple for a struct, a dict with bytes keys; judged the same alone or among others
    ([10, 20, 30.0], pa.list_(pa.int64())), ({"x": 3.0}, _BOX), ([np.True_, False], pa.list_(pa.bool_())),
    ([float("nan"), -0.0], pa.list_(pa.float64())), ([0.1], pa.list_(pa.float32())), ((1, 2), _BOX),
    ({b"x": 1}, _BOX), ({"k": 2.0}, pa.map_(pa.string(), pa.int64())),
]


@pytest.mark.parametrize("value, column", FITTING)
def test_values_of_the_columns_kind_fit(value, column):
    assert label_problem("x", value, column) is None


NOT_FITTING = [
    ("cat", pa.int64(), "label 'x' holds 'cat' (type str); its column holds int64"),
    (2.5, pa.int64(), "label 'x' holds 2.5 (type float); its column holds int64"),  # pyarrow would truncate it
    (True, pa.int64(), "label 'x' holds True (type bool); its column holds int64"),
    (1, pa.bool_(), "label 'x' holds 1 (type int); its column holds bool"),
    (True, pa.float64(), "label 'x' holds True (type bool); its column holds double"),
    (3, pa.string(), "label 'x' holds 3 (type int); its column holds string"),
    ("a" * 60, pa.int64(), f"label 'x' holds '{'a' * 36}... (type str); its column holds int64"),
    (2 ** 70, pa.int64(), f"label 'x' holds {2 ** 70} (type int); its column holds int64"),
    (-1, pa.uint8(), "label 'x' holds -1 (type int); its column holds uint8"),
    (np.zeros(2), pa.int64(), "label 'x' holds array([0., 0.]) (type ndarray); its column holds int64"),
    (["a"], pa.list_(pa.int64()), "label 'x' holds ['a'] (type list); its column holds list<item: int64>: Could "
                                  "not convert 'a' with type str: tried to convert to int64"),
    # inside lists and structs pyarrow truncates a fraction and drops a key the struct lacks
    ({"x": 8.75, "y": 1}, _BOX, "label 'x' holds {'x': 8.75, 'y': 1} (type dict); its column holds struct<x: int64, "
                                "y: int64>: ['x'] holds 8.75 (type float), which the column would hold as 8"),
    ({"x": 1, "w": 3}, _BOX, "label 'x' holds {'x': 1, 'w': 3} (type dict); its column holds struct<x: int64, y: "
                             "int64>: it has the key 'w', which the column's struct lacks"),
    ([[1, 2], [3, 4.5]], pa.list_(pa.list_(pa.int64())), "label 'x' holds [[1, 2], [3, 4.5]] (type list); its column "
                                                         "holds list<item: list<item: int64>>: [1][1] holds 4.5 (type "
                                                         "float), which the column would hold as 4"),
    ([{"x": True}], pa.list_(_BOX), "label 'x' holds [{'x': True}] (type list); its column holds list<item: "
                                    "struct<x: int64, y: int64>>: Expected integer, got bool"),
    ({"k": 2.5}, pa.map_(pa.string(), pa.int64()), "label 'x' holds {'k': 2.5} (type dict); its column holds "
                                                   "map<string, int64>: ['k'] holds 2.5 (type float), which the column "
                                                   "would hold as 2"),
    (np.array(3), pa.list_(pa.int64()), "label 'x' holds array(3) (type ndarray); its column holds list<item: "
                                        "int64>: Can only convert 1-dimensional array values of list<item: int64> to "
                                        "a variable-sized list"),
    # where the column is narrower than the type pyarrow infers (judged in a batch by that type)
    ([2 ** 40], pa.list_(pa.int32()), "label 'x' holds [1099511627776] (type list); its column holds list<item: "
                                      "int32>: Value 1099511627776 too large to fit in C integer type"),
    ([1, 2, 3], pa.list_(pa.int64(), 2), "label 'x' holds [1, 2, 3] (type list); its column holds "
                                         "fixed_size_list<item: int64>[2]: Length of item not correct: expected 2 but "
                                         "got array of size 3"),
    (np.array([1.5]), pa.list_(pa.int64()), "label 'x' holds array([1.5]) (type ndarray); its column holds "
                                            "list<item: int64>: [0] holds 1.5 (type float), which the column would hold as 1"),
]


@pytest.mark.parametrize("value, column, reason", NOT_FITTING)
def test_values_of_another_type_are_named_with_both_types(value, column, reason):
    assert label_problem("x", value, column) == reason


def _samples(labels):
    return [Sample(i, f"s{i}", b"", dict(row)) for i, row in enumerate(labels)]


def test_a_batch_keeps_the_samples_that_fit_in_order_and_names_each_other_sample():
    fields = [pa.field("label", pa.int64()), pa.field("score", pa.float64())]
    samples = _samples([{"label": 1, "score": 0.5}, {"label": "cat", "score": "high"}, {"label": None, "score": 2},
                        {"label": 4, "score": [1.0]}, {"label": 5}])
    good, bad = split_unfit(samples, fields)
    assert [s.index for s in good] == [0, 2, 4]
    assert bad == [BadSample(1, "s1", "label 'label' holds 'cat' (type str); its column holds int64"),
                   BadSample(3, "s3", "label 'score' holds [1.0] (type list); its column holds double")]
    fitting = samples[:1] + samples[2:3]
    assert split_unfit(fitting, fields) == (fitting, [])
    assert split_unfit(samples, []) == (samples, []), "no typed column: nothing to check"


@pytest.mark.parametrize("value, column, reason", [(v, c, None) for v, c in FITTING] + NOT_FITTING)
def test_a_batch_judges_each_value_as_alone_among_values_of_plain_types(value, column, reason):
    # the batch's check by type first (ints in an int column...) must agree with the value's own
    plain = {pa.types.is_boolean: True, pa.types.is_integer: 7, pa.types.is_floating: 1.5,
             pa.types.is_string: "a", pa.types.is_large_string: "a", pa.types.is_binary: b"a"}
    neighbour = next((v for is_kind, v in plain.items() if is_kind(column)), None)
    samples = _samples([{"x": neighbour}, {"x": value}, {"x": neighbour}])
    good, bad = split_unfit(samples, [pa.field("x", column)])
    assert [s.index for s in good] == ([0, 2] if reason else [0, 1, 2])
    assert bad == ([BadSample(1, "s1", reason)] if reason else [])


def test_a_label_every_sample_took_from_a_column_of_its_type_is_not_checked():
    field = pa.field("x", pa.list_(pa.int64()))
    exact = [Sample(i, f"s{i}", b"", {"x": [2.5]}, frozenset({"x"})) for i in range(2)]
    assert split_unfit(exact, [field]) == (exact, [])  # (a source that says so is taken at its word)
    mixed = exact[:1] + _samples([{"x": [2.5]}])
    good, bad = split_unfit(mixed, [field])
    assert good == [] and len(bad) == 2  # one sample not taken so: the column is checked for all
