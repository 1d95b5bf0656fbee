"""Hostile and malformed ``params`` to ``/infer/medsam2_2d`` and ``/infer/medsam2_3d`` (property-based): a clear 4xx,
never a 500, a hang or a dead server."""

from __future__ import annotations

import math

from fuzz_testing import (
    FUZZ,
    assert_refused,
    hostile_params,
    infer,
    session_bytes,
    url_text,
)
from hypothesis import example, given
from hypothesis import strategies as st


@FUZZ
@given(params=hostile_params(dimension=2))
@example(
    params={
        "label": "lesion",
        "roi": [10, 40, 10, 40, 5, 5],
        "slice": 5,
        "save_label": True,
        "label_tag": "../../escaped",
    }
)
@example(params={"prompts": [{"slice": 2, "box": [1, 2, math.nan, 40]}]})
@example(params={"label": "\ud800", "roi": [10, 40, 10, 40, 5, 5], "slice": 5})
@example(params={"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 1e300})
@example(params={"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 5, "changed_since": "gone.1"})
def test_2d_hostile_params_are_refused(fuzz_server, studies, params):
    r = infer(fuzz_server, "medsam2_2d", params, "infer_2d_params")
    assert_refused(r, params)
    assert not (studies.parent / "escaped").exists()


@FUZZ
@given(params=hostile_params(dimension=3))
@example(params={"label": "lesion", "roi": [10, 40, 10, 40, 5, 8], "stop_patience": math.inf})
@example(params={"label": "lesion", "roi": [10, 40, 10, 40, 5, 8], "model": "medsam2_2d", "correction": [1]})
@example(params={"prompts": [{"label": "lesion", "slice": 5, "box": [10, 10, 40, 40]}], "slice_range": [0, 16]})
@example(params={"prompts": [{"label": "lesion", "slice": 5, "box": [10, 10, 40, 40]}], "slice_range": [-1, 3]})
@example(params={"label": "lesion", "roi": [10, 40, 10, 40, 5, 8], "changed_since": "0123abcd.7"})
@example(params={"undo": True, "changed_since": "0123abcd.7"})
def test_3d_hostile_params_are_refused_before_propagating(fuzz_server, params):
    before = session_bytes(fuzz_server)
    r = infer(fuzz_server, "medsam2_3d", params, "infer_3d_params")
    assert_refused(r, params)
    # refused while parsing, before any slice was encoded (one encoded slice adds megabytes to the cache;
    # opening ct_blob for a new client adds about 0.4 MB)
    assert session_bytes(fuzz_server) - before < 1 << 20, ("slices were encoded", params)


RAW_PARAMS = [
    "{not json",
    "",
    "null",
    "[]",
    "[1, 2]",
    "42",
    '"a string"',
    "true",
    "NaN",
    "[" * 100_000 + "]" * 100_000,
    '{"a": ' * 5000 + "1" + "}" * 5000,
    '{"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 5',
    '{"label": "lesion"}' + "x" * 10,
    "\x00\x01\x02",
    "{" + '"k": 1, ' * 20_000 + '"z": 2}',
    '{"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 5, "client_id": ' + "[" * 900 + "]" * 900 + "}",
]


@FUZZ
@given(
    raw=st.one_of(
        st.sampled_from(RAW_PARAMS), url_text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))
    )
)
@example(raw="null")
@example(raw='{"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 5, "client_id": "' + "x" * 2_000_000 + '"}')
@example(raw="[" * 100_000)
def test_malformed_params_text_is_refused(fuzz_server, raw):
    for model in ("medsam2_2d", "medsam2_3d"):
        r = infer(fuzz_server, model, raw, "infer_raw_params")
        assert_refused(r, raw[:100])


# ---------------------------------------------------------------------------------------- image ids and paths
