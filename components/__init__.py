"""KFP v2 components: one file per pipeline step, each the typed interface of one step.

A component body is one call, `tlpipe.kfp.runtime.<component>(<its parameters in order>)`,
which builds the step's config from the JSON parameters, runs the step through the one runner
(`tlpipe.runner.run_step`) and fills the KFP outputs (metadata included). Nothing else: the
logic lives in the package. Dependencies point one way:
pipelines/ → components/ → tlpipe.

They are lightweight components on the tlpipe image with `install_kfp_package=False` and no
`packages_to_install`: the image already holds kfp and tlpipe, so a pod installs nothing, and
`kfp.local.SubprocessRunner(use_venv=False)` runs the same components with the current
interpreter (the one `tlpipe` is installed in).

No `from __future__ import annotations` in this package: KFP reads the annotations.
"""

import os

# Image of every CPU step and of the GPU steps (pretrain, baseline, finetune); both built from
# the repo's Dockerfile (`--build-arg VARIANT=cpu|cuda`). Override at compile time through the
# environment, e.g. `TLPIPE_IMAGE=registry.local/tlpipe:dev python -m pipelines.transfer_learning`.
TLPIPE_IMAGE = os.environ.get("TLPIPE_IMAGE") or "registry.example.com/tlpipe/tlpipe:0.1.0-cpu"
TLPIPE_GPU_IMAGE = (
    os.environ.get("TLPIPE_GPU_IMAGE") or "registry.example.com/tlpipe/tlpipe:0.1.0-cuda"
)
