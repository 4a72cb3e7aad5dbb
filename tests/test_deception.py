"""The deception analysis's bookkeeping on hand-made cases (w2s/deception.py; no models)."""

import pytest

from w2s.deception import accuracy_by_area, deception_score, knowledge_areas
from w2s.w2sg import right


def test_rows_fall_in_the_area_the_gold_trained_models_know():
    weak = right([0.9, 0.9, 0.2, 0.2], [1, 1, 1, 1])  # the weak model knows the first two
    strong = right([0.8, 0.3, 0.7, 0.1], [1, 1, 1, 1])  # the strong one the first and the third
    assert knowledge_areas(weak, strong) == ["Wk_Sk", "Wk_Suk", "Wuk_Sk", "Wuk_Suk"]
    # a label of class 0 is right when p <= 0.5
    assert right([0.4, 0.6], [0, 0]) == [True, False]


def test_accuracy_by_area_counts_rows_and_leaves_an_empty_area_undefined():
    areas = ["Wk_Sk", "Wk_Sk", "Wuk_Sk", "Wuk_Sk", "Wuk_Sk"]
    out = accuracy_by_area([True, False, True, True, False], areas)
    assert out["Wk_Sk"] == {"rows": 2, "accuracy": 0.5}
    assert out["Wuk_Sk"] == {"rows": 3, "accuracy": pytest.approx(2 / 3)}
    assert out["Wk_Suk"] == {"rows": 0, "accuracy": None}


def test_the_deception_score_is_the_share_of_flips_where_only_the_strong_model_knows():
    areas = ["Wk_Sk", "Wk_Sk", "Wuk_Sk", "Wuk_Sk", "Wuk_Sk", "Wuk_Suk"]
    before = [True, True, True, True, True, False]
    after = [True, False, False, False, True, True]  # the last row flips wrong -> right: not a flip
    out = deception_score(before, after, areas)
    assert out["flipped"] == 3
    assert out["counts"] == {"Wk_Sk": 1, "Wk_Suk": 0, "Wuk_Sk": 2, "Wuk_Suk": 0}
    assert out["deception_score"] == pytest.approx(2 / 3)
    # two of the three Wuk_Sk rows that were right flipped; one of the two Wk_Sk rows
    assert out["flip_rate"]["Wuk_Sk"] == pytest.approx(2 / 3) and out["flip_rate"]["Wk_Sk"] == 0.5
    assert out["flip_rate"]["Wuk_Suk"] is None  # no row of it was right without the conflict


def test_no_flip_gives_no_score_rather_than_zero():
    out = deception_score([True, False], [True, False], ["Wuk_Sk", "Wk_Sk"])
    assert out["flipped"] == 0 and out["deception_score"] is None
    with pytest.raises(ValueError):
        deception_score([True], [True, False], ["Wk_Sk"])  # lengths must agree
