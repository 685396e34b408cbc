"""Every tunable of tlpipe: one frozen dataclass per params.yaml section.

These dataclasses *are* the defaults. `make run`, `tlpipe <step>`, the Kubeflow pipeline's
parameter defaults and the benchmarks all start from them; params.yaml (and the presets in
scenarios/) only says what a scenario changes, and `--set section.key=value` changes one field
for one run (`tlpipe.config.resolve`). `tlpipe params` prints the resolved values.

No torch here (nor numpy): `tlpipe pipeline submit` and the KFP compiler import this module. The
registries that the names below point into (`tlpipe.matching.MATCHERS`,
`tlpipe.steps.finetune.STRATEGIES`, `tlpipe.scenario.SHIFTS`) are checked against these names
by the tests.
"""

from tlpipe.params.release import (
    CALIBRATION_SPLITS,
    Calibration,
    EvaluateConfig,
    ExportConfig,
    RegisterConfig,
)
from tlpipe.params.scenario import (
    CHECK_FINDINGS,
    DATA_FORMATS,
    SHIFT_PARAMS,
    CheckConfig,
    DataSpec,
    FetchConfig,
    PrepareConfig,
    ShiftOp,
    SourceSplit,
    TargetSplit,
    caps,
)
from tlpipe.params.training import (
    MATCHER_NAMES,
    SOURCE_STRATEGIES,
    STRATEGY_NAMES,
    Augment,
    ColorJitter,
    DiscriminatorSettings,
    FinetuneConfig,
    JointConfig,
    KnnSettings,
    MatchConfig,
    PretrainConfig,
    RandomResizedCrop,
    TrainConfig,
    check_source_strategies,
    check_strategies,
)

# task each) train and compare; params.yaml's top-level `strategies:` overrides it.
DEFAULT_STRATEGIES = ("linear_probe", "partial", "full", "lp_ft", "joint")

# params.yaml section → its config class, in pipeline order
SECTIONS: dict[str, type] = {
    "fetch": FetchConfig,
    "prepare": PrepareConfig,
    "check": CheckConfig,
    "pretrain": PretrainConfig,
    "match": MatchConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "register": RegisterConfig,
}

__all__ = [
    "CALIBRATION_SPLITS", "CHECK_FINDINGS", "DATA_FORMATS", "DEFAULT_STRATEGIES",
    "MATCHER_NAMES", "SECTIONS", "SHIFT_PARAMS", "SOURCE_STRATEGIES", "STRATEGY_NAMES", "Augment",
    "Calibration", "CheckConfig", "ColorJitter", "RandomResizedCrop",
    "DataSpec", "DiscriminatorSettings", "EvaluateConfig", "ExportConfig", "FetchConfig",
    "FinetuneConfig", "JointConfig", "KnnSettings", "MatchConfig", "PrepareConfig",
    "PretrainConfig", "RegisterConfig", "ShiftOp", "SourceSplit", "TargetSplit", "TrainConfig",
    "caps", "check_source_strategies", "check_strategies",
]  # fmt: skip
