"""Every tunable of tlpipe: one frozen dataclass per params.yaml section.

These dataclasses *are* the defaults. `make run`, `tlpipe <step>`, the Kubeflow pipeline's
parameter defaults and the benchmarks all start from them; params.yaml (and the presets in
scenarios/) only says what a scenario changes, and `--set section.key=value` changes one field
for one run (`tlpipe.params.resolver.resolve`). `tlpipe params` prints the resolved values.

No torch here (nor numpy): `tlpipe pipeline submit` and the KFP compiler import this module. The
registries that the names below point into (`tlpipe.match.matchers.MATCHERS`,
`tlpipe.steps.finetune.STRATEGIES`, `tlpipe.data.splitting.SHIFTS`) are checked against these names
by the tests.
"""

from tlpipe.params.inputs import (
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
from tlpipe.params.learning import (
    DEFAULT_STRATEGIES,
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
    Workers,
    check_source_strategies,
    check_strategies,
)
from tlpipe.params.outputs import (
    CALIBRATION_SPLITS,
    Calibration,
    EvaluateConfig,
    ExportConfig,
    RegisterConfig,
)
from tlpipe.params.resolver import SECTIONS, Resolved, resolve

__all__ = [
    "Workers",
    "CALIBRATION_SPLITS",
    "CHECK_FINDINGS",
    "DATA_FORMATS",
    "DEFAULT_STRATEGIES",
    "MATCHER_NAMES",
    "SECTIONS",
    "SHIFT_PARAMS",
    "SOURCE_STRATEGIES",
    "STRATEGY_NAMES",
    "Augment",
    "Calibration",
    "CheckConfig",
    "ColorJitter",
    "RandomResizedCrop",
    "DataSpec",
    "DiscriminatorSettings",
    "EvaluateConfig",
    "ExportConfig",
    "FetchConfig",
    "FinetuneConfig",
    "JointConfig",
    "KnnSettings",
    "MatchConfig",
    "PrepareConfig",
    "PretrainConfig",
    "RegisterConfig",
    "ShiftOp",
    "SourceSplit",
    "TargetSplit",
    "TrainConfig",
    "caps",
    "check_source_strategies",
    "check_strategies",
    "Resolved",
    "resolve",
]
