"""Model Assessment Framework: how much each cut point's IR reveals, and where to cut.

Run locally by the model owner (`infenclave assess`). The first exposure method is the KL
oracle (`kl.py`: projection of feature maps, KL against the model's own prediction), run by
the scan loop (`scan.py`) and recorded in a versioned partition plan (`plan.py`,
`plan.schema.json`) and a self-contained HTML report (`report.py`). `command.py` is what the
CLI calls.
"""

from infenclave.assess.command import AssessOptions, AssessOutcome, run_assess
from infenclave.assess.kl import Oracle, kl_divergence, kl_to_uniform, make_oracle, minmax_normalise, project
from infenclave.assess.plan import PLAN_VERSION, Plan, build_plan, schema, validate_plan
from infenclave.assess.report import Figure, ReportInputs, render_report
from infenclave.assess.runtime import RuntimeConfig
from infenclave.assess.scan import AssessImage, ScanResult, scan

__all__ = [
    "PLAN_VERSION",
    "AssessImage",
    "AssessOptions",
    "AssessOutcome",
    "Figure",
    "Oracle",
    "Plan",
    "ReportInputs",
    "RuntimeConfig",
    "ScanResult",
    "build_plan",
    "kl_divergence",
    "kl_to_uniform",
    "make_oracle",
    "minmax_normalise",
    "project",
    "render_report",
    "run_assess",
    "scan",
    "schema",
    "validate_plan",
]
