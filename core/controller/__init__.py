"""The confidence-aware controller (ATLAS) and the policies it is compared against.

`calibration` maps drafter confidences to acceptance probabilities, `costs` predicts step time, `policy` is
ATLAS itself (a `PolicyBase` using the peek and trim hooks), `baselines` holds the SGLang-adaptive and oracle
policies, `registry` every policy by name (with the drafters each plans over), `settings` the
`ADASPEC_CONTROLLER_*` knobs.
"""

from adaspec.core.controller.baselines import OraclePolicy, SGLangAdaptiveParams, SGLangAdaptivePolicy
from adaspec.core.controller.calibration import Calibrator, pav
from adaspec.core.controller.costs import CostModel
from adaspec.core.controller.policy import AtlasPolicy
from adaspec.core.controller.registry import LEARNED, drafters_for, make_policy, names, policy_drafters
from adaspec.core.controller.settings import ControllerSettings, load_controller_settings

__all__ = [
    "LEARNED",
    "AtlasPolicy",
    "Calibrator",
    "ControllerSettings",
    "CostModel",
    "OraclePolicy",
    "SGLangAdaptiveParams",
    "SGLangAdaptivePolicy",
    "drafters_for",
    "load_controller_settings",
    "make_policy",
    "names",
    "pav",
    "policy_drafters",
]
