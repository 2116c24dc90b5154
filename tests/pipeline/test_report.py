"""The summary a run prints."""

from pipeline._records import BadSample
from pipeline._report import Summary


def test_the_summary_names_the_inspect_command_as_a_shell_reads_it_braces_and_spaces_included():
    bad = [BadSample(i, str(i), "unreadable").to_dict() for i in range(12)]  # more than the summary lists
    summary = Summary(output="/data/run {1}", layers={"conv": {"shape": [4], "dtype": "float16"}}, samples=20,
                      rows={"conv": 8}, bytes={"conv": 64}, bad=bad, shards=2, resumed=0, actors=1, seconds=1.0,
                      new_samples=20)
    text = summary.format()
    assert "... `actmap inspect '/data/run {1}'` lists all 12" in text
    assert text.endswith("`actmap inspect '/data/run {1}'` describes the dump")


def test_the_summary_says_what_reading_back_gives_for_fixed_and_variable_shapes():
    def said(shape):
        summary = Summary(output="/d", layers={"conv": {"shape": shape, "dtype": "float16"}}, samples=2,
                          rows={"conv": 2}, bytes={"conv": 64}, bad=[], shards=1, resumed=0, actors=1, seconds=1.0,
                          new_samples=2)
        return summary.format().splitlines()[-1]

    assert "pipeline.read_layer('/d', 'conv') -> numpy array;" in said([4])
    assert "pipeline.read_layer('/d', 'conv') -> list of arrays, one shape per row;" in said(None)
