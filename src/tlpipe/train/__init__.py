"""Training: models, the one training loop, joint source+target steps, resume files.

`models` builds networks through a registry (tlpipe's small CNNs, torchvision families) and
reads/writes checkpoints; `loop` is the one `fit()` that pretrain, the scratch baseline and
every fine-tune strategy call; `joint` adds the match-weighted source stream; `resume` keeps
checked per-epoch resume files.

May import: `tlpipe.data`, `tlpipe.params`, `tlpipe.fsio`, `tlpipe.errors`.
"""
