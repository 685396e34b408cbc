"""Property-based tests (Hypothesis): the params resolver and the raw readers' header parsing
take any input and either give a checked result or one `TlpipeError` line, nothing else."""

from __future__ import annotations

import dataclasses
import gzip
import struct
import types
import typing
from pathlib import Path

import numpy as np
import pytest
from conftest import write_idx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlpipe.data.readers import read_idx
from tlpipe.errors import TlpipeError
from tlpipe.params import fields, resolver

FEW = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def ranged_fields() -> list[tuple[str, type, fields.Range]]:
    """(dotted key, int or float, range) of every numeric param that states a range."""
    found = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls, include_extras=True)[f.name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            options = typing.get_args(hint) if union else (hint,)
            for option in options:
                if typing.get_origin(option) is typing.Annotated:
                    base, *extra = typing.get_args(option)
                    ranges = [r for r in extra if isinstance(r, fields.Range)]
                    found.extend((prefix + f.name, base, r) for r in ranges)
                elif dataclasses.is_dataclass(option):
                    walk(option, f"{prefix}{f.name}.")

    for section, cls in resolver.SECTIONS.items():
        walk(cls, f"{section}.")
    return found


RANGED = ranged_fields()


def test_every_param_named_in_the_issue_has_a_range() -> None:
    keys = {key for key, _, _ in RANGED}
    named = [
        "finetune.backbone_lr_scale",
        "finetune.l2sp",
        "finetune.train.momentum",
        "finetune.train.steps_per_epoch",
        "finetune.train.weight_decay",
        "register.significance",
        "fetch.max_unpack_bytes",
        "prepare.max_image_bytes",
    ]
    assert set(named) <= keys
    assert len(RANGED) > 50


def test_every_numeric_param_states_its_range() -> None:
    """A new int or float param must say its range (`fields.above`, `at_least`, `between`)."""
    unranged = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls, include_extras=True)[f.name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            for option in typing.get_args(hint) if union else (hint,):
                if option in (int, float):
                    unranged.append(prefix + f.name)
                elif dataclasses.is_dataclass(option):
                    walk(option, f"{prefix}{f.name}.")

    for section, cls in resolver.SECTIONS.items():
        walk(cls, f"{section}.")
    assert unranged == []


numbers = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.0, 1.0, 0.5, 1e-12, 2**63]),
)


@FEW
@given(field=st.sampled_from(RANGED), value=numbers)
def test_a_numeric_param_is_taken_only_inside_its_range(field, value) -> None:
    key, base, allowed = field
    wrong_type = base is int and isinstance(value, float)
    try:
        resolved = resolver.resolve({}, [f"{key}={value!r}"])
    except TlpipeError as e:
        message = str(e)
        assert "\n" not in message
        if not wrong_type and value in allowed:  # another rule (e.g. val + test < 1) refused it
            assert "out of range" not in message
        else:
            assert key in message and (repr(value) in message or "must be" in message)
        return
    assert not wrong_type and value in allowed
    section, *path = key.split(".")
    got = resolved[section]
    for name in path:
        got = getattr(got, name)
    assert got == value


@FEW
@given(
    head=st.binary(min_size=0, max_size=4),
    dims=st.lists(st.integers(0, 2**32 - 1), max_size=5),
    body=st.binary(max_size=64),
    gz=st.booleans(),
)
def test_any_idx_header_reads_or_is_refused_in_one_line(tmp_path_factory, head, dims, body, gz):
    path = tmp_path_factory.mktemp("idx") / "f"
    data = head + b"".join(struct.pack(">I", d) for d in dims) + body
    path.write_bytes(gzip.compress(data) if gz else data)
    try:
        array = read_idx(path, max_ratio=10)
    except TlpipeError as e:
        assert "\n" not in str(e)
        return
    assert array.dtype == np.uint8 and array.size == len(body)  # what is read is what is there


@FEW
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_valid_idx_reads_back_exactly(tmp_path_factory, shape, gz, seed) -> None:
    x = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    path = write_idx(tmp_path_factory.mktemp("idx") / "f", x, gz)
    assert np.array_equal(read_idx(path), x)


@pytest.mark.parametrize("declared", [(10, 28, 28), (2**20, 2**20, 2**20)])
def test_an_idx_header_that_declares_too_much_is_refused_before_allocation(
    tmp_path: Path, declared
) -> None:
    x = np.zeros((10, 28, 28), np.uint8)
    path = write_idx(tmp_path / "f.gz", x)
    raw = gzip.decompress(path.read_bytes())
    header = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", *declared)
    path.write_bytes(gzip.compress(header + raw[16:]))
    if declared == x.shape:
        assert read_idx(path).shape == x.shape
    else:
        with pytest.raises(TlpipeError, match="more than prepare.max_unpack_ratio"):
            read_idx(path)


@FEW
@given(
    u=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=12),
    fractions=st.tuples(st.floats(0.01, 0.5), st.floats(0.01, 0.5)),
    given_test=st.none() | st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_a_class_split_is_disjoint_and_moves_at_most_one_image(u, fractions, given_test) -> None:
    """Every image in exactly one split; at most one image leaves the split its hash gives
    (val/test promotion); a class of >= 3 images without its own test flags always has a test
    image, and lacks a val image only when fewer than 2 images are left outside test."""
    from tlpipe.data.splitting import class_masks
    from tlpipe.params import TargetSplit

    h = np.array(u)
    own = None if given_test is None else np.array(given_test[: len(h)])
    t = TargetSplit(test_fraction=fractions[0], val_fraction=fractions[1])
    train, val, test = class_masks(h, own, t)
    assert (train.astype(int) + val + test == 1).all()
    natural_test = own if own is not None else h < t.test_fraction
    lo = 0 if own is not None else t.test_fraction
    natural_val = ~natural_test & (h >= lo) & (h < lo + t.val_fraction)
    assert (test != natural_test).sum() <= 1 and (val != natural_val).sum() <= 2
    if own is None and len(h) >= 3:
        assert test.any()
    if not val.any():
        assert (~test).sum() < 2
