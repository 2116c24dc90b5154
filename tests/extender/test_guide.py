"""The user guide holds every example of the user's seed document, in order and word for word.

The guide itself runs as a doctest (pytest collects ``docs/*.rst``); this test checks that none
of the seed's examples went missing or changed on the way into it.
"""

import doctest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "model_extension.rst"
SEED = ROOT.parent / "shared" / "seed" / "model_extension.rst"


def _examples(path: Path) -> list[tuple[str, str]]:
    parser = doctest.DocTestParser()
    return [(e.source, e.want) for e in parser.get_examples(path.read_text())]


@pytest.mark.skipif(not SEED.is_file(), reason="the seed document lies beside the checkout only in the team's workplace")
def test_guide_contains_every_seed_example_in_order():
    guide = iter(_examples(GUIDE))
    missing = [example for example in _examples(SEED) if example not in guide]
    assert missing == []
