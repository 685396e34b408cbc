"""Data: the user's raw files in, prepared splits on disk out, batches for training.

`readers` and `image_files` decode IDX, NPZ, ImageFolders and CSV/Parquet manifests (refusing
what would escape the data root); `download` and `s3` fetch them with deadlines and checksums;
`splitting` assigns images to the source and target splits by content hash; `prepared` reads
and writes those splits (memory-mapped `.npy`, `manifest.json`); `loader` turns them into the
deterministic (seed, epoch, step) batches every training loop uses.

May import: `tlpipe.params`, `tlpipe.fsio`, `tlpipe.errors`. Never torch at import time.
"""
