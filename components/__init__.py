"""KFP v2 components: one file per pipeline step, each the typed interface of one step.

A component body imports `tlpipe`, builds the step's config from a JSON parameter, calls
`tlpipe.steps.<step>.run` and records the result (MLflow through `tlpipe.tracking`, KFP
metadata through its `Output[...]` artifacts). Nothing else: the logic lives in the library.

They are lightweight components on the tlpipe image with `install_kfp_package=False` and no
`packages_to_install`: the image already holds kfp and tlpipe, so a pod installs nothing, and
`kfp.local.SubprocessRunner(use_venv=False)` runs the same components with the current
interpreter (the one `tlpipe` is installed in).

No `from __future__ import annotations` in this package: KFP reads the annotations.
"""

import os

# Image of every CPU step and of the GPU steps (pretrain, baseline, finetune); both built from
# the repo's Dockerfile (`--build-arg VARIANT=cpu|cuda`). Override at compile time through the
# environment, e.g. `TLPIPE_IMAGE=registry.local/tlpipe:dev tlpipe pipeline compile`.
TLPIPE_IMAGE = os.environ.get("TLPIPE_IMAGE") or "registry.example.com/tlpipe/tlpipe:0.1.0-cpu"
TLPIPE_GPU_IMAGE = (
    os.environ.get("TLPIPE_GPU_IMAGE") or "registry.example.com/tlpipe/tlpipe:0.1.0-cuda"
)
