"""Kubeflow Pipelines: the pod runtime the components call, the client, `tlpipe pipeline`.

`runtime` is what every component body calls (config from the JSON parameter, the one runner,
KFP outputs filled); `client` compiles, submits and schedules through the KFP SDK;
`pipeline_cli` is the `tlpipe pipeline` command; `transfer_learning.yaml` is the compiled DAG,
shipped as package data so an installed tlpipe needs no checkout.

May import everything below it (`tlpipe.runner`, steps, params). Nothing in the library
imports it. Heavy imports (kfp) stay inside functions.
"""
