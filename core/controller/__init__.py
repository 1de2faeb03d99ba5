"""The confidence-aware controller (ATLAS) and the policies it is compared against.

`calibration` maps drafter confidences to acceptance probabilities, `costs` predicts step time, `policy` is
ATLAS itself (an engine `Policy` with an optional `trim` hook), `baselines` holds fixed-k, SGLang-adaptive and
oracle policies, `settings` the `ADASPEC_CONTROLLER_*` knobs.
"""

from adaspec.core.controller.baselines import (
    POLICY_NAMES,
    OraclePolicy,
    SGLangAdaptiveParams,
    SGLangAdaptivePolicy,
    adaptive_alone,
    fixed_static,
    fixed_suffix,
    make_policy,
    policy_drafters,
)
from adaspec.core.controller.calibration import Calibrator, pav
from adaspec.core.controller.costs import CostModel
from adaspec.core.controller.policy import AtlasPolicy
from adaspec.core.controller.settings import ControllerSettings, load_controller_settings

__all__ = [
    "POLICY_NAMES",
    "AtlasPolicy",
    "Calibrator",
    "ControllerSettings",
    "CostModel",
    "OraclePolicy",
    "SGLangAdaptiveParams",
    "SGLangAdaptivePolicy",
    "adaptive_alone",
    "fixed_static",
    "fixed_suffix",
    "load_controller_settings",
    "make_policy",
    "pav",
    "policy_drafters",
]
