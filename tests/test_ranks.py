"""RankSpace: label <-> index <-> value <-> name."""

import numpy as np
import pytest

from l2rclip.config import RanksConfig
from l2rclip.ranks import RankError, RankSpace


def test_ages_with_number_words():
    space = RankSpace.from_config(RanksConfig(start=16, stop=77))
    assert len(space) == 62 and space.names[0] == "sixteen" and space.names[-1] == "seventy-seven"
    assert space.index_of(16) == 0 and space.index_of("23") == 7 and space.index_of(np.int64(77)) == 61
    assert space.value_of(7) == 23.0
    np.testing.assert_array_equal(space.indices([16, "17", 18.0]), [0, 1, 2])


def test_decades_and_custom_names():
    space = RankSpace.from_config(RanksConfig(labels=(1930, 1940, 1950), names="labels", name_format="{}s"))
    assert space.names == ("1930s", "1940s", "1950s") and space.index_of("1950") == 2
    groups = RankSpace(["(0, 2)", "(4, 6)", "(8, 12)"], values=[1, 5, 10], names=["baby", "child", "kid"])
    assert groups.index_of("(4, 6)") == 1 and groups.value_of(2) == 10.0
    assert RankSpace.from_dict(groups.to_dict()) == groups


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.index_of(99), r"label 99 is not a rank: expected one of 1 \.\. 10"),
        (lambda s: s.indices([1, "x"]), r"row 1: label 'x' is not a rank"),
    ],
)
def test_out_of_range_labels(call, match):
    with pytest.raises(RankError, match=match):
        call(RankSpace.from_config(RanksConfig()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": [1]}, "at least 2"),
        ({"labels": [1, 1, 2]}, "unique"),
        ({"labels": ["a", "b"]}, "not numeric"),
        ({"labels": [1, 2], "values": [2, 1]}, "increase strictly"),
        ({"labels": [1, 2], "names": ["one"]}, "expected 2 names"),
    ],
)
def test_bad_definitions(kwargs, match):
    with pytest.raises(RankError, match=match):
        RankSpace(**kwargs)


def test_probability_columns_are_named_by_label():
    assert RankSpace(range(16, 20)).probability_columns() == ("p_16", "p_17", "p_18", "p_19")
    assert RankSpace(["20", 21.0, 22]).probability_columns() == ("p_20", "p_21", "p_22")  # one name per number
    groups = RankSpace(["(0, 2)", "(4, 6)", "60+"], values=[1, 5, 80])
    assert groups.probability_columns() == ("p_0_2", "p_4_6", "p_60+")
    assert RankSpace([-1, 2.5], names=["a", "b"]).probability_columns() == ("p_-1", "p_2.5")


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (["a b", "a_b"], r"'a b' and 'a_b' both name the probability column p_a_b"),
        (["()", "x"], r"\['\(\)'\] have no letter or digit"),
    ],
)
def test_labels_that_cannot_name_distinct_columns_are_refused(labels, match):
    with pytest.raises(RankError, match=match):
        RankSpace(labels, values=[1, 2])
