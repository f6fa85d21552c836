"""The statistical verdict: exact Clopper-Pearson bounds, and "not enough evidence" on few photos."""

from __future__ import annotations

import pytest
from scipy.stats import beta

from infenclave.assess.attacks.evidence import NOT_ENOUGH, SAFE, UNSAFE, judge_evidence, photos_needed, upper_bound
from infenclave.errors import AssessmentError


def test_bound_with_nothing_recovered_is_the_closed_form() -> None:
    assert upper_bound(0, 3) == pytest.approx(1 - 0.05 ** (1 / 3))  # the 63%
    assert upper_bound(0, 3) == pytest.approx(0.6316, abs=1e-4)
    assert upper_bound(0, 29) == pytest.approx(0.0981, abs=1e-4)


def test_bound_with_recoveries_is_the_exact_beta_quantile() -> None:
    for k, n in [(1, 29), (3, 40), (7, 8)]:
        assert upper_bound(k, n) == pytest.approx(beta.ppf(0.95, k + 1, n - k))
    assert upper_bound(8, 8) == 1.0 and upper_bound(0, 0) == 1.0


def test_29_photos_none_recovered_is_the_least_evidence_for_ten_percent() -> None:
    assert photos_needed(0.10) == 29
    assert judge_evidence(0, 29).verdict == SAFE
    assert judge_evidence(0, 28).verdict == NOT_ENOUGH


def test_verdicts() -> None:
    assert judge_evidence(0, 5).verdict == NOT_ENOUGH  # clean, but 5 photos prove little
    assert judge_evidence(1, 40).verdict == UNSAFE
    assert judge_evidence(1, 60).verdict == SAFE  # 1 of 60: bound 7.7%
    corrected = judge_evidence(0, 40, cuts_tried=5)
    assert corrected.alpha == pytest.approx(0.01) and corrected.verdict == NOT_ENOUGH


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(AssessmentError):
        upper_bound(3, 2)
    with pytest.raises(AssessmentError, match="max-recovery"):
        judge_evidence(0, 10, max_recovery=1.5)
