"""fetch: get the raw data and say which version it is (never cached: it notices new data)."""

from kfp import dsl

from components import TLPIPE_IMAGE


@dsl.component(base_image=TLPIPE_IMAGE, install_kfp_package=False)
def fetch(fetch_params: str) -> str:
    """Fetch the raw dataset (checksum-verified) and return its version: a sha256 of its files.

    Only the version leaves this step. `prepare` is cached on it and fetches again itself
    when the version is new: an artifact from an uncached step would change every run and
    so defeat the cache of every step after it.
    """
    from tlpipe.kfp import runtime

    return runtime.fetch(fetch_params)
