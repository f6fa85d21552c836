"""From "k of n photos recovered" to a verdict a model owner can bet on: an exact upper bound.

A cut point is *safe* only when the one-sided 95% Clopper-Pearson upper bound on its recovery
rate (the share of photos an attacker recovers) is at most the owner's `--max-recovery`
(default 10%). With k = 0 the bound is 1 - alpha^(1/n): 0 of 3 recovered still allows a 63%
recovery rate, 0 of 29 allows 9.8%, so 29 photos, none recovered, is the least evidence that
supports a 10% claim (`photos_needed`). Fewer photos than that give the verdict
**not enough evidence**, never "safe", however clean the attacks looked.

Choosing the FrontNet end is a search over several cut points; the first one that happens to
pass is favoured by the search itself. The assessment (`assess.adversary`) chooses by a
fixed-sequence test on the evaluation photos (valid at 5% without a correction) and then,
when the confirmation set is large enough (`can_confirm`: at least `photos_needed` photos),
confirms the chosen cut on those photos, which took no part in choosing it (a fresh,
uncorrected bound that alone decides the verdict). A Bonferroni correction (alpha / m per cut,
`judge_evidence(cuts_tried=m)`) is implemented for callers that search without either. Which
one the assessment used is recorded in the plan.

Verdict values (the plan's `recommendation.verdict` and every per-cut `verdict`), defined here
once so that the CLI maps them to exit codes without reading prose:

- `safe`: the bound is <= max recovery;
- `unsafe`: at least one photo was recovered and the bound is above max recovery;
- `not-enough-evidence`: nothing was recovered but there were too few photos for the bound to
  reach max recovery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from infenclave.errors import AssessmentError

CONFIDENCE = 0.95  # one-sided
ALPHA = 0.05  # = 1 - CONFIDENCE, written exactly
DEFAULT_MAX_RECOVERY = 0.10  # the default: 29 photos, none recovered

Verdict = Literal["safe", "unsafe", "not-enough-evidence"]
SAFE: Verdict = "safe"
UNSAFE: Verdict = "unsafe"
NOT_ENOUGH: Verdict = "not-enough-evidence"
VERDICTS: tuple[Verdict, ...] = (SAFE, UNSAFE, NOT_ENOUGH)


def upper_bound(k: int, n: int, alpha: float = ALPHA) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a rate with k successes of n.

    Exact (beta quantile), so it is valid for every n, including the small ones where a
    normal approximation would claim far too much. With n = 0 nothing is known: 1.0.
    """
    if n < 0 or k < 0 or k > n:
        raise AssessmentError(f"cannot bound {k} of {n}")
    if not 0.0 < alpha < 1.0:
        raise AssessmentError(f"alpha must be in (0, 1), not {alpha}")
    if n == 0 or k == n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)  # closed form, and what the docs quote
    from scipy.stats import beta

    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def photos_needed(max_recovery: float, alpha: float = ALPHA) -> int:
    """The fewest photos for which "0 recovered" supports a recovery rate <= max_recovery."""
    check_max_recovery(max_recovery)
    return math.ceil(math.log(alpha) / math.log(1.0 - max_recovery))


def can_confirm(photos: int, max_recovery: float = DEFAULT_MAX_RECOVERY, alpha: float = ALPHA) -> bool:
    """True when `photos` fresh photos can confirm a cut: were none recovered, their bound alone
    would reach `max_recovery`. With fewer, a confirmation could never say "safe"."""
    return photos >= photos_needed(max_recovery, alpha)


def check_max_recovery(max_recovery: float) -> None:
    """Refuse a bound that is not a rate (one clear line for the CLI)."""
    if not 0.0 < max_recovery < 1.0:
        raise AssessmentError(f"--max-recovery must be between 0 and 1 (exclusive), not {max_recovery}")


@dataclass(frozen=True)
class Evidence:
    """k of n photos recovered at one cut and what that supports."""

    recovered: int
    photos: int
    bound: float  # one-sided upper bound on the recovery rate at `alpha`
    alpha: float  # after any correction for the number of cuts tried
    cuts_tried: int  # the Bonferroni factor (1: uncorrected)
    max_recovery: float
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "recovered": self.recovered,
            "photos": self.photos,
            "upper_bound": round(self.bound, 6),
            "alpha": round(self.alpha, 6),
            "cuts_tried": self.cuts_tried,
            "max_recovery": self.max_recovery,
            "verdict": self.verdict,
        }

    def sentence(self) -> str:
        corr = f", corrected for {self.cuts_tried} cut points tried" if self.cuts_tried > 1 else ""
        return (
            f"{self.recovered} of {self.photos} photos recovered; the recovery rate is at most "
            f"{self.bound:.1%} (one-sided {1 - ALPHA:.0%} Clopper-Pearson{corr})"
        )


def judge_evidence(
    recovered: int, photos: int, max_recovery: float = DEFAULT_MAX_RECOVERY, *, cuts_tried: int = 1
) -> Evidence:
    """The verdict for k of n recovered, the bound corrected for `cuts_tried` cut points."""
    check_max_recovery(max_recovery)
    if cuts_tried < 1:
        raise AssessmentError("cuts_tried must be at least 1")
    alpha = ALPHA / cuts_tried
    bound = upper_bound(recovered, photos, alpha)
    if bound <= max_recovery:
        verdict: Verdict = SAFE
    elif recovered == 0:
        verdict = NOT_ENOUGH
    else:
        verdict = UNSAFE
    return Evidence(recovered, photos, bound, alpha, cuts_tried, max_recovery, verdict)
