"""Sample matching: which source images resemble the target, as importance weights.

`matchers` holds the registry (discriminator, knn, class, uniform) over embeddings made by the
pretrained backbone; `ratio` fits the density ratio p_target(x)/p_source(x) and its
diagnostics (held-out accuracy, proxy A-distance, effective sample size).

May import: `tlpipe.params`, `tlpipe.errors`. Takes arrays, returns arrays: no files, no torch
models (the step `tlpipe.steps.match` embeds).
"""
