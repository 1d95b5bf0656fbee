"""Hostile and malformed input against the real server: property-based requests to ``/infer/medsam2_2d``,
``/infer/medsam2_3d`` and ``/train/medsam2``, path-like image ids, broken uploads, too-large volumes.

Every case must get a 4xx with a clear ``detail``: never a 500, a hang (requests time out), a file read outside
the datastore, a training run started, or a dead server (``/info/`` is asked after each batch). Hypothesis runs
a fixed, derandomized budget so CI is deterministic; the cases tried are counted and printed at the end.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import struct
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from test_cine import real_ultrasound_loop, write_multiframe_dicom

from conftest import start_server, stop_server

# ct_blob in the `studies` fixture: (k, j, i) = (16, 80, 96); xray_2d: 64 x 64
NK, NJ, NI = 16, 80, 96
LABELS = {"lesion": 1, "organ": 2, "vessel": 3, "other": 4}
REQUEST_TIMEOUT_S = 30  # a hostile request answered later than this counts as a hang
SERVED_TIMEOUT_S = 180  # requests that may run the model (CPU, shared machine)
CASES: Counter[str] = Counter()

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """Print how many cases each part tried, past pytest's output capture (so it shows with -q too)."""
    yield
    lines = [f"fuzz cases tried: {sum(CASES.values())} in all"] + [f"  {k}: {v}" for k, v in sorted(CASES.items())]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------- helpers


def server_errors(server) -> int:
    """Unhandled exceptions in the server's log (its access log is off, so a 500 shows as a traceback);
    tracebacks of the logging module's own encoding errors are not server errors."""
    text = server.log.read_text(errors="replace")
    return text.count("Traceback (most recent call last)") - text.count("--- Logging error ---")


def assert_refused(r: requests.Response, what, statuses: tuple[int, ...] | None = None) -> str:
    """A 4xx (one of ``statuses`` if given) with a readable ``detail``; returns the detail as text."""
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:500])
    if statuses is not None:
        assert r.status_code in statuses, (what, r.status_code, r.text[:500])
    assert "Traceback" not in r.text, (what, r.text[:500])
    detail = r.json().get("detail")
    text = detail if isinstance(detail, str) else json.dumps(detail)
    assert detail and len(text) >= 10, (what, r.text[:500])
    return text


def post(server, path: str, part: str, timeout: float = REQUEST_TIMEOUT_S, **kw) -> requests.Response:
    """POST one case; no answer within ``timeout`` fails the test as a hang."""
    CASES[part] += 1
    try:
        return requests.post(server.url + path, timeout=timeout, **kw)
    except requests.Timeout:
        pytest.fail(f"{part}: no answer within {timeout} s to POST {path[:200]} {str(kw)[:300]}")


def infer(server, model: str, params, part: str, image: str = "ct_blob", **kw) -> requests.Response:
    text = params if isinstance(params, str) else json.dumps(params)
    return post(server, f"/infer/{model}?image={quote(image, safe='')}&output=json", part, data={"params": text}, **kw)


@pytest.fixture(scope="module")
def fuzz_server(server):
    """The session's server, warmed up (model built, ct_blob open) so that timeouts measure hostile input only."""
    r = server.post(
        "/infer/medsam2_2d?image=ct_blob&output=json",
        data={"params": json.dumps({"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 5})},
    )
    assert r.status_code == 200, r.text
    before = server_errors(server)
    yield server
    assert server.alive(), "the server died"
    assert server_errors(server) == before, f"unhandled exceptions in the server log: {server.log}"


def session_bytes(server) -> int:
    """Bytes held by the model's session cache (encoded slices, images), from /info/."""
    return int(server.get("/info/", timeout=REQUEST_TIMEOUT_S).json()["session_cache"]["medsam2"]["bytes"])


def check_alive(server) -> None:
    assert server.proc.poll() is None, "the server process exited"
    assert server.get("/info/", timeout=REQUEST_TIMEOUT_S).status_code == 200


# ------------------------------------------------------------------------------------------------ strategies


def url_text(**kw) -> st.SearchStrategy[str]:
    """Text that can be sent in a URL or a form field (UTF-8: no lone surrogates; JSON carries those)."""
    return st.text(st.characters(exclude_categories=("Cs",)), **kw)


FLAG_WORDS = {"1", "true", "yes", "on", "0", "false", "no", "off", ""}


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# values that are not a finite number in any form the parser accepts
not_a_number = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, "nan", "NaN", "Infinity", "-inf", "1e999", True, False]),
    st.text(min_size=1, max_size=6).filter(lambda t: not _is_number_text(t)),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
huge = st.one_of(st.floats(1e9 + 1, 1e308), st.integers(10**9 + 1, 10**30), st.floats(-1e308, -1e9 - 1))
bad_coordinate = st.one_of(not_a_number, huge)


def _unknown_label(value) -> bool:
    if isinstance(value, str) and value.lower() in LABELS:
        return False
    if isinstance(value, (int, str)) and not isinstance(value, bool) and value not in ("", None):
        try:
            return int(value) not in LABELS.values()
        except ValueError:
            return True
    return value not in (None, "")


unknown_label = st.one_of(
    st.text(max_size=12), st.integers(-(10**6), 10**6), st.lists(st.integers(), max_size=2), st.booleans()
).filter(_unknown_label)
not_a_flag = st.one_of(
    st.text(max_size=6).filter(lambda t: t.strip().lower() not in FLAG_WORDS),
    st.integers().filter(lambda n: n not in (0, 1)),
    st.lists(st.integers(), min_size=1, max_size=2),
    st.floats(allow_nan=True).filter(lambda f: f not in (0, 1)),
)
not_a_list = st.one_of(
    st.integers(),
    st.text(min_size=1, max_size=6),
    st.dictionaries(st.text(max_size=2), st.integers(), min_size=1, max_size=2),
)


def _outside(n: int):
    """An index pair entirely outside 0..n-1 (both below or both above)."""
    below = st.tuples(st.integers(-(10**6), -1), st.integers(-(10**6), -1))
    above = st.tuples(st.integers(n, 10**8), st.integers(n, 10**8))
    return st.one_of(below, above)


@st.composite
def bad_roi(draw, in_plane_only: bool = False):
    """An IJK ROI [i0, i1, j0, j1, k0, k1] that cannot be served on ct_blob."""
    roi = [10, 40, 10, 40, 5, 8]
    kind = draw(st.sampled_from(["entry", "length", "type", "outside", "zero", "clipped_zero"]))
    if kind == "entry":
        roi[draw(st.integers(0, 5))] = draw(bad_coordinate)
    elif kind == "length":
        roi = draw(st.lists(st.integers(0, 10), min_size=1, max_size=12).filter(lambda v: len(v) != 6))
    elif kind == "type":
        return draw(not_a_list)
    elif kind == "outside":
        axis = draw(st.integers(0, 1 if in_plane_only else 2))
        roi[2 * axis : 2 * axis + 2] = draw(_outside((NI, NJ, NK)[axis]))
    elif kind == "zero":
        axis = draw(st.integers(0, 1))
        v = draw(st.integers(0, (NI, NJ)[axis] - 1))
        roi[2 * axis : 2 * axis + 2] = [v, v]
    else:  # partly outside, clipped to a single column or row
        axis = draw(st.integers(0, 1))
        n = (NI, NJ)[axis]
        roi[2 * axis : 2 * axis + 2] = draw(st.sampled_from([[n - 1, n + 50], [-50, 0]]))
    return roi


@st.composite
def bad_box(draw):
    """A native box [x0, y0, x1, y1] (x = i, y = j) that cannot be served on ct_blob's slices."""
    box = [10, 10, 40, 40]
    kind = draw(st.sampled_from(["entry", "length", "type", "outside", "zero", "clipped_zero"]))
    if kind == "entry":
        box[draw(st.integers(0, 3))] = draw(bad_coordinate)
    elif kind == "length":
        box = draw(st.lists(st.integers(0, 10), min_size=1, max_size=8).filter(lambda v: len(v) != 4))
    elif kind == "type":
        return draw(not_a_list)
    elif kind == "outside":
        axis = draw(st.integers(0, 1))
        box[axis], box[axis + 2] = draw(_outside((NI, NJ)[axis]))
    elif kind == "zero":
        axis = draw(st.integers(0, 1))
        box[axis] = box[axis + 2] = draw(st.integers(0, (NI, NJ)[axis] - 1))
    else:
        axis = draw(st.integers(0, 1))
        n = (NI, NJ)[axis]
        box[axis], box[axis + 2] = draw(st.sampled_from([(n - 1, n + 50), (-50, 0)]))
    return box


@st.composite
def bad_points(draw, dims: int = 3):
    """A foreground/background list that cannot be served: wrong shape, not numbers, or outside the volume
    (``dims`` 3: IJK points of the viewer form; 2: (x, y) points of the native form)."""
    good = [[20, 20, 5][:dims]]
    kind = draw(st.sampled_from(["type", "dims", "entry", "outside", "many"]))
    if kind == "type":
        return draw(not_a_list)
    if kind == "dims":
        return [draw(st.lists(st.integers(0, 10), max_size=6).filter(lambda p: len(p) != dims))]
    if kind == "many":
        return good * 1001
    point = list(good[0])
    axis = draw(st.integers(0, dims - 1))
    if kind == "entry":
        point[axis] = draw(bad_coordinate)
    else:
        point[axis] = draw(st.one_of(st.integers(-(10**8), -1), st.integers((NI, NJ, NK)[axis], 10**8)))
    return good + [point]


def deeply_nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


# top-level keys MONAI Label itself acts on: each value is refused by the request guard
reserved_mutations = st.one_of(
    st.tuples(
        st.just("label_tag"),
        st.one_of(
            st.sampled_from(["../../escape", "/tmp/x", "..", "a/b", "x" * 100]),
            st.integers(),
            st.lists(st.text(max_size=2), max_size=2),
        ),
    ),
    st.tuples(st.just("save_label"), not_a_flag.filter(lambda v: not isinstance(v, bool))),
    st.tuples(
        st.just("timeout"),
        st.one_of(
            st.sampled_from([0, -1, math.nan, math.inf, "10"]),
            not_a_number.filter(lambda v: not isinstance(v, (int, float)) or isinstance(v, bool)),
        ),
    ),
    st.tuples(
        st.just("device"),
        st.one_of(
            st.integers(),
            st.lists(st.text(max_size=3), max_size=2),
            st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
        ),
    ),
    st.tuples(st.just("image"), st.sampled_from(["/etc/passwd", "../../etc/passwd", "xray_2d", "broken", 5, None])),
    st.tuples(st.just("model"), st.sampled_from(["medsam2_xx", "", 3, None, "../train"])),
    st.tuples(st.just("client_id"), st.integers(17, 60).map(deeply_nested)),
)


@st.composite
def hostile_params(draw, dimension: int):
    """A params object with 1-3 defects; each defect alone makes the request unservable on ct_blob."""
    native = draw(st.booleans())
    if native:
        params = {"prompts": [{"label": "lesion", "slice": 5, "box": [10, 10, 40, 40]}]}
    elif dimension == 2:
        params = {"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 5, "client_id": "fuzz"}
    else:
        params = {"label": "lesion", "roi": [10, 40, 10, 40, 5, 8], "client_id": "fuzz"}
    mutations = ["reserved"]
    if native:
        mutations += [
            "prompts_type",
            "prompts_many",
            "entry_type",
            "entry_slice",
            "entry_box",
            "entry_points",
            "entry_empty",
            "entry_label",
        ]
        if dimension == 2:
            mutations.append("two_slices")
    else:
        mutations += ["roi", "points", "label"]
        if dimension == 2:
            mutations.append("slice")
    if dimension == 3:
        mutations += ["axis", "stop_patience", "stop_score", "flag"]
    for mutation in draw(st.lists(st.sampled_from(mutations), min_size=1, max_size=3, unique=True)):
        prompts = params.get("prompts")
        entry = prompts[0] if isinstance(prompts, list) and prompts else None
        if mutation == "reserved":
            key, value = draw(reserved_mutations)
            if key == "image" and value is None:
                value = "/etc/passwd"
            if key == "model" and value in ("", None):
                value = "medsam2_yy"
            params[key] = value
        elif mutation == "prompts_type":
            params["prompts"] = draw(not_a_list)
        elif mutation == "prompts_many":
            params["prompts"] = [{"label": "lesion", "slice": 5, "box": [10, 10, 40, 40]}] * 257
        elif mutation == "entry_type" and isinstance(prompts, list) and prompts:
            params["prompts"][0] = draw(
                st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=3))
            )
        elif mutation == "entry_slice" and isinstance(entry, dict):
            entry["slice"] = draw(st.one_of(bad_coordinate, st.integers(-(10**8), -1), st.integers(NK, 10**8)))
        elif mutation == "entry_box" and isinstance(entry, dict):
            entry["box"] = draw(bad_box())
        elif mutation == "entry_points" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["foreground", "background"]))] = draw(bad_points(dims=2))
        elif mutation == "entry_empty" and isinstance(entry, dict):
            entry.pop("box", None)
        elif mutation == "entry_label" and isinstance(entry, dict):
            entry["label"] = draw(unknown_label)
        elif mutation == "two_slices" and isinstance(params["prompts"], list):
            params["prompts"].append({"label": "organ", "slice": 6, "box": [10, 10, 40, 40]})
        elif mutation == "roi":
            params["roi"] = draw(bad_roi())
        elif mutation == "points":
            params[draw(st.sampled_from(["foreground", "background"]))] = draw(bad_points())
        elif mutation == "label":
            params["label"] = draw(unknown_label)
        elif mutation == "slice":
            params["slice"] = draw(st.one_of(bad_coordinate, st.integers(-(10**8), -1), st.integers(NK, 10**8)))
        elif mutation == "axis":
            params["axis"] = draw(
                st.one_of(
                    st.text(max_size=8), st.integers(), st.lists(st.text(max_size=2), min_size=1, max_size=2)
                ).filter(lambda v: str(v).strip().lower() not in ("", "axial", "k", "coronal", "j", "sagittal", "i"))
            )
        elif mutation == "stop_patience":
            params["stop_patience"] = draw(
                st.one_of(bad_coordinate, st.integers(-(10**6), 0), st.integers(1001, 10**8))
            )
        elif mutation == "stop_score":
            params["stop_min_object_score"] = draw(
                st.one_of(bad_coordinate, st.floats(100.5, 1e300), st.floats(-1e300, -100.5))
            )
        elif mutation == "flag":
            params[draw(st.sampled_from(["stop_rule", "correction", "reset_state"]))] = draw(not_a_flag)
    if native and not isinstance(params.get("prompts"), list) and params.get("prompts") in (None, "", []):
        params["prompts"] = "none"
    return params


# ------------------------------------------------------------------------------------------------ /infer params


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
def test_2d_hostile_params_are_refused(fuzz_server, studies, params):
    r = infer(fuzz_server, "medsam2_2d", params, "infer_2d_params")
    assert_refused(r, params)
    assert not (studies.parent / "escaped").exists()


@FUZZ
@given(params=hostile_params(dimension=3))
@example(params={"label": "lesion", "roi": [10, 40, 10, 40, 5, 8], "stop_patience": math.inf})
@example(params={"label": "lesion", "roi": [10, 40, 10, 40, 5, 8], "model": "medsam2_2d", "correction": [1]})
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


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Path:
    """A valid image outside the datastore (under the temp folder, where MONAI Label puts uploads)."""
    path = tmp_path_factory.mktemp("outside") / "canary.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 32, 32), 100, np.int16)), str(path))
    return path


def path_like_ids(canary: Path, studies: Path) -> list[str]:
    rel_from_repo = os.path.relpath(canary, Path.cwd())
    rel_from_studies = os.path.relpath(canary, studies)
    return [
        "../../etc/passwd",
        "/etc/passwd",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e/%2e%2e/etc/passwd",
        "%252e%252e%252fetc%252fpasswd",
        "..\\..\\etc\\passwd",
        "....//....//etc/passwd",
        "/proc/self/environ",
        "/dev/zero",
        "/dev/urandom",
        "file:///etc/passwd",
        "~/.bashrc",
        str(canary),
        str(canary)[:-7],
        rel_from_repo,
        rel_from_studies,
        "../" + canary.parent.name + "/canary",
        str(studies / "ct_blob.nii.gz"),
        "ct_blob\x00.nii.gz",
        "ct_blob/../ct_blob",
        "./ct_blob",
        ".",
        "..",
        "apps",
        "tests/conftest.py",
        "C:\\Windows\\win.ini",
        "x" * 5000,
    ]


@FUZZ
@given(data=st.data())
def test_path_like_image_ids_never_read_outside_the_datastore(fuzz_server, studies, canary, data):
    known = path_like_ids(canary, studies)
    image = data.draw(
        st.one_of(
            st.sampled_from(known),
            url_text(min_size=1, max_size=30).filter(lambda t: t not in ("ct_blob", "xray_2d", "broken")),
            st.sampled_from(known).map(lambda p: quote(p, safe="")),
        )
    )
    model = data.draw(st.sampled_from(["medsam2_2d", "medsam2_3d"]))
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 3, 3], "slice": 3}
    where = data.draw(st.sampled_from(["query", "params", "raw_query", "session_id"]))
    if where == "query":
        r = infer(fuzz_server, model, params, "image_ids", image=image)
    elif where == "params":
        r = infer(fuzz_server, model, dict(params, image=image), "image_ids")
    elif where == "session_id":
        r = post(
            fuzz_server,
            f"/infer/{model}?session_id={quote(image, safe='')}&output=json",
            "image_ids",
            data={"params": json.dumps(params)},
        )
    else:  # as typed: %2e%2e and friends decoded by the server only
        r = post(
            fuzz_server,
            f"/infer/{model}?image={image.replace('&', '%26').replace('#', '%23')}&output=json",
            "image_ids",
            data={"params": json.dumps(params)},
        )
    # 415 would mean a file was opened and found unreadable: ids never reach files outside the datastore
    detail = assert_refused(r, image[:200], statuses=(400, 404, 422))
    assert "root:" not in detail


def test_each_known_path_is_refused_in_every_place(fuzz_server, studies, canary):
    """The fixed list above, every id in the query, in params and as session_id, for both models."""
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 3, 3], "slice": 3}
    for image in path_like_ids(canary, studies):
        for model in ("medsam2_2d", "medsam2_3d"):
            for r in (
                infer(fuzz_server, model, params, "image_ids", image=image),
                infer(fuzz_server, model, dict(params, image=image), "image_ids"),
                post(
                    fuzz_server,
                    f"/infer/{model}?session_id={quote(image, safe='')}",
                    "image_ids",
                    data={"params": json.dumps(params)},
                ),
            ):
                assert_refused(r, image[:100], statuses=(400, 404))
    check_alive(fuzz_server)
    # the id that names the canary's folder would have been served if paths under the temp folder passed
    r = infer(fuzz_server, "medsam2_2d", params, "image_ids", image=str(canary))
    assert r.status_code == 400 and "path" in r.json()["detail"]


def test_missing_image_unknown_model_and_dicom_seg_output(fuzz_server):
    params = json.dumps({"label": "lesion", "roi": [2, 20, 2, 20, 3, 3], "slice": 3})
    cases = [
        ("/infer/medsam2_2d?output=json", 400, "No image"),
        ("/infer/medsam2_2d?image=&output=json", 400, "No image"),
        ("/infer/no_such_model?image=ct_blob&output=json", 404, "Unknown model"),
        ("/infer/medsam2_2d?image=ct_blob&output=dicom_seg", 400, "dicom_seg"),
        ("/infer/medsam2_2d?image=ct_blob&output=pdf", 422, "output"),
    ]
    for path, status, words in cases:
        r = post(fuzz_server, path, "infer_misc", data={"params": params})
        detail = assert_refused(r, path, statuses=(status,))
        assert words.lower() in detail.lower(), detail
    check_alive(fuzz_server)


# ------------------------------------------------------------------------------------------------- uploads


def _volume_bytes(suffix: str, shape_kji=(6, 32, 32)) -> bytes:
    """A small valid int16 volume written (uncompressed unless .gz) as ``suffix``."""
    image = sitk.GetImageFromArray((np.arange(np.prod(shape_kji)) % 200).reshape(shape_kji).astype(np.int16))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz_{os.getpid()}{suffix}"
    sitk.WriteImage(image, str(path), useCompression=suffix.endswith(".gz"))
    data = path.read_bytes()
    path.unlink()
    return data


def huge_header_nifti(dims=(2000, 2000, 2000)) -> bytes:
    """A NIfTI-1 header declaring ``dims`` (int16 voxels) followed by a few bytes of data: a header check
    refuses it (413); decoding it would fail (truncated) or allocate gigabytes."""
    raw = bytearray(_volume_bytes(".nii", (2, 4, 4)))
    struct.pack_into("<8h", raw, 40, 3, *dims, 1, 1, 1, 1)
    return bytes(raw[:400])


def huge_header_nrrd(sizes=(100_000, 100_000, 100_000)) -> bytes:
    header = f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\nencoding: raw\n\n"
    return header.encode() + b"\x00" * 64


def _dicom_bytes(kind: str) -> bytes:
    if kind == "ct":
        return Path(get_testdata_file("CT_small.dcm")).read_bytes()
    if kind == "mr":
        return Path(get_testdata_file("MR_small.dcm")).read_bytes()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz_cine_{os.getpid()}.dcm"
    write_multiframe_dicom(path, real_ultrasound_loop(), "RGB", FrameTime=20.0)
    data = path.read_bytes()
    path.unlink()
    return data


SOURCES: dict[str, bytes] = {}


def source(kind: str) -> bytes:
    if kind not in SOURCES:
        SOURCES[kind] = {
            "nii_gz": lambda: _volume_bytes(".nii.gz"),
            "nii": lambda: _volume_bytes(".nii"),
            "nrrd": lambda: _volume_bytes(".nrrd"),
            "mha": lambda: _volume_bytes(".mha"),
            "dcm_ct": lambda: _dicom_bytes("ct"),
            "dcm_mr": lambda: _dicom_bytes("mr"),
            "dcm_cine": lambda: _dicom_bytes("cine"),
        }[kind]()
    return SOURCES[kind]


SUFFIX = {
    "nii_gz": ".nii.gz",
    "nii": ".nii",
    "nrrd": ".nrrd",
    "mha": ".mha",
    "dcm_ct": ".dcm",
    "dcm_mr": ".dcm",
    "dcm_cine": ".dcm",
}
NOT_IMAGES = {
    "empty.nii.gz": b"",
    "empty.dcm": b"",
    "passwd.nii.gz": b"root:x:0:0:root:/root:/bin/bash\n",
    "report.pdf.dcm": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
    "archive.nii.gz": b"PK\x03\x04" + b"\x00" * 200,
    "program.nrrd": b"\x7fELF\x02\x01\x01" + b"\x00" * 500,
    "page.mha": b"<html><body>not an image</body></html>",
    "gzip_of_text.nii.gz": gzip.compress(b"hello world " * 100),
    "bogus.mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4,
    "huge.nii": huge_header_nifti(),
    "huge.nrrd": huge_header_nrrd(),
    "overflow.nrrd": huge_header_nrrd((2**40, 2**40, 2**40)),
    "zeros.nii": b"\x00" * (8 << 20),
}
HOSTILE_NAMES = [
    "../../../../tmp/evil{suffix}",
    "/etc/passwd{suffix}",
    "..\\..\\evil{suffix}",
    "a" * 300 + "{suffix}",
    "x." + "z" * 300,
    "scan{suffix}\x00.sh",
    "scan.%2e%2e%2f{suffix}",
    "{suffix}",
    "scan.tar.gz.zip.exe.sh.py{suffix}",
]


@st.composite
def broken_upload(draw) -> tuple[str, bytes]:
    """(file name, bytes): a truncated NIfTI/DICOM, a file that is no image, or a header far over the limits."""
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(NOT_IMAGES)))
        data = NOT_IMAGES[name]
        if draw(st.booleans()) and data:
            data = data + draw(st.binary(max_size=64))
        suffix = "".join(Path(name).suffixes[-2:]) if name.endswith(".nii.gz") else Path(name).suffix
    else:
        kind = draw(st.sampled_from(sorted(SUFFIX)))
        full = source(kind)
        cut = draw(st.integers(0, len(full) - 1))
        data = full[:cut]
        if draw(st.booleans()):  # damaged rather than cut: random bytes over the pixel data
            data = full[: len(full) // 2] + draw(st.binary(min_size=1, max_size=256))
        name, suffix = "scan" + SUFFIX[kind], SUFFIX[kind]
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(HOSTILE_NAMES)).format(suffix=suffix)
    return name, data


@FUZZ
@given(upload=broken_upload(), model=st.sampled_from(["medsam2_2d", "medsam2_3d"]))
@example(upload=("huge.nii", huge_header_nifti()), model="medsam2_2d")
@example(upload=("scan.nii", _volume_bytes(".nii")[:348]), model="medsam2_2d")
@example(upload=("scan.nii", _volume_bytes(".nii")[:-1]), model="medsam2_3d")
@example(upload=("overflow.nrrd", huge_header_nrrd((2**40, 2**40, 2**40))), model="medsam2_2d")
@example(upload=("scan.nii.gz\x00.sh", b"\x00" * 10), model="medsam2_2d")
@example(upload=("x." + "z" * 300, b"\x00" * 10), model="medsam2_2d")
def test_broken_uploads_are_refused(fuzz_server, upload, model):
    name, data = upload
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 1, 1], "slice": 1}
    r = post(
        fuzz_server,
        f"/infer/{model}?output=json",
        "uploads",
        data={"params": json.dumps(params)},
        files={"file": (name, io.BytesIO(data), "application/octet-stream")},
    )
    detail = assert_refused(r, (name[:80], len(data)))
    assert "root:" not in detail
    if name in ("huge.nii", "huge.nrrd"):  # refused from the header (decoding would need terabytes)
        assert r.status_code == 413 and "max_voxels" in detail, detail
    if name == "overflow.nrrd":  # sizes whose product overflows 64 bits: ITK refuses the header
        assert r.status_code in (413, 415), detail


def test_uploads_of_real_images_still_work(fuzz_server):
    """The upload checks keep real files usable (also with an odd file name)."""
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 1, 1], "slice": 1}
    for name in ("scan.nii.gz", "../../odd name.v2.nii.gz"):
        r = post(
            fuzz_server,
            "/infer/medsam2_2d?output=json",
            "uploads",
            timeout=SERVED_TIMEOUT_S,
            data={"params": json.dumps(params)},
            files={"file": (name, io.BytesIO(source("nii_gz")), "application/octet-stream")},
        )
        assert r.status_code == 200, r.text
        assert r.json()["image"]["shape_ijk"] == [32, 32, 6]
    check_alive(fuzz_server)


def _image_bytes(array: np.ndarray, suffix: str = ".nii.gz", vector: bool = False) -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuzz_odd_{os.getpid()}{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    data = path.read_bytes()
    path.unlink()
    return data


# name: (array (k, j, i) or (j, i, channels), vector image, models to ask). Each request encodes at least one
# slice, so the 3D model is asked only where it refuses at once (a single slice) or has two slices to track.
ODD_IMAGES = {
    "one voxel": (np.ones((1, 1, 1), np.int16), False, ("medsam2_2d", "medsam2_3d")),
    "a line, 1 x 300 x 1": (np.arange(300, dtype=np.int16).reshape(1, 300, 1), False, ("medsam2_3d",)),
    "two slices of 2 x 2": (np.arange(8, dtype=np.int16).reshape(2, 2, 2), False, ("medsam2_3d",)),
    "NaN and Inf voxels": (np.array([[[np.nan, np.inf], [-np.inf, 1.0]]] * 3, np.float32), False, ("medsam2_2d",)),
    "int64 extremes": (
        np.array([[[np.iinfo(np.int64).min, np.iinfo(np.int64).max]] * 2] * 2),
        False,
        ("medsam2_2d",),
    ),
    "colour 2D": (np.full((8, 8, 3), 200, np.uint8), True, ("medsam2_2d",)),
}


@pytest.mark.parametrize("what", sorted(ODD_IMAGES))
def test_odd_but_readable_images_never_crash_the_server(fuzz_server, what):
    """Tiny, non-finite, extreme or colour images with an in-range click: served or a 4xx, never a 500."""
    array, vector, models = ODD_IMAGES[what]
    for model in models:
        params = {"label": "lesion", "foreground": [[0, 0, 0]], "slice": 0}
        r = post(
            fuzz_server,
            f"/infer/{model}?output=json",
            "odd_images",
            timeout=SERVED_TIMEOUT_S,
            data={"params": json.dumps(params)},
            files={"file": ("odd.nii.gz", io.BytesIO(_image_bytes(array, vector=vector)), "application/octet-stream")},
        )
        assert r.status_code == 200 or 400 <= r.status_code < 500, (what, model, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert_refused(r, (what, model))
    check_alive(fuzz_server)


# ------------------------------------------------------------------------------------------------- /train


TRAIN_NUMERIC = [
    "epochs", "steps_per_epoch", "clip_length", "max_objects", "lr", "lr_image_encoder", "weight_decay",
    "grad_clip", "val_fraction", "nsd_tolerance_mm", "p_box", "p_mask", "p_correction", "p_cross_end", "seed",
]  # fmt: skip
not_a_train_number = st.one_of(
    not_a_number,
    st.floats(1e15, 1e308),
    st.integers(2**64, 2**80),
    st.floats(-1e308, -1e-9),
    st.integers(-(2**63), -1),
    st.dictionaries(st.text(max_size=2), st.integers(), min_size=1, max_size=2),
)


@st.composite
def hostile_train_body(draw) -> dict:
    """A body with 1-3 entries, each alone enough to refuse it: an unknown option or an invalid value."""
    body: dict = {}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["numeric", "numeric", "choice", "device", "gpus", "multi_gpu", "unknown", "model"])
        )
        if kind == "numeric":
            body[draw(st.sampled_from(TRAIN_NUMERIC))] = draw(not_a_train_number)
        elif kind == "choice":
            body[draw(st.sampled_from(["train_parts", "loss"]))] = draw(
                st.one_of(
                    st.integers(),
                    st.lists(st.text(max_size=3), min_size=1, max_size=2),
                    st.text(min_size=1, max_size=10),
                ).filter(lambda v: v not in ("all", "no_image_encoder", "no_encoders", "sam2", "dice_ce"))
            )
        elif kind == "device":
            body["device"] = draw(
                st.one_of(
                    st.integers(),
                    st.sampled_from(["gpu", "cuda:x", "tpu", "../cpu", "cuda:99999"]),
                    st.lists(st.integers(), min_size=1, max_size=2),
                )
            )
        elif kind == "gpus":
            body["multi_gpu"] = True
            body["gpus"] = draw(
                st.one_of(
                    st.sampled_from(["0,0", "a,b", "99", "-1", "0,1,2,3,4,5,6,7,8"]),
                    st.floats(allow_nan=True),
                    st.dictionaries(st.text(max_size=2), st.integers(), min_size=1, max_size=2),
                )
            )
        elif kind == "multi_gpu":
            body["multi_gpu"] = draw(not_a_flag)
        elif kind == "model":
            body["model"] = draw(st.sampled_from(["medsam2_2d", "other", "../x"]))
        else:
            body[
                draw(
                    st.text(min_size=1, max_size=12).filter(
                        lambda k: k not in TRAIN_NUMERIC
                        and k not in ("train_parts", "loss", "device", "gpus", "multi_gpu", "model")
                    )
                )
            ] = draw(st.one_of(st.integers(), st.text(max_size=4), st.integers(1, 40).map(deeply_nested)))
    return body


def no_training_running(server) -> bool:
    r = server.get("/train/?check_if_running=true", timeout=REQUEST_TIMEOUT_S)
    return r.status_code == 404


@pytest.fixture(scope="module")
def train_guard(fuzz_server):
    """Stop any training that a case got started (a failure in itself) and check none is left running."""
    started: list[str] = []
    yield started
    if not no_training_running(fuzz_server):
        requests.delete(fuzz_server.url + "/train/", timeout=REQUEST_TIMEOUT_S)
    deadline = time.time() + 30
    while not no_training_running(fuzz_server) and time.time() < deadline:
        time.sleep(0.5)
    assert no_training_running(fuzz_server), "a training run is still going"
    assert not started, f"training was started by hostile bodies: {started[:5]}"


@settings(FUZZ, max_examples=80)
@given(body=hostile_train_body(), run_sync=st.sampled_from([None, "true", "false"]))
@example(body={"epochs": math.inf}, run_sync=None)
@example(body={"epochs": 3.5}, run_sync="true")
@example(body={"seed": -1}, run_sync=None)
@example(body={"lr": math.nan}, run_sync=None)
@example(body={"epochs": 10**12}, run_sync=None)
@example(body={"device": "tpu"}, run_sync=None)
@example(body={"model": "other"}, run_sync=None)
@example(body={"epochs": True}, run_sync=None)
def test_hostile_train_bodies_never_start_training(fuzz_server, train_guard, body, run_sync):
    query = f"?run_sync={run_sync}" if run_sync else ""
    text = json.dumps(body, allow_nan=True)
    r = post(fuzz_server, f"/train/medsam2{query}", "train", data=text, headers={"Content-Type": "application/json"})
    if r.status_code < 400:
        train_guard.append(text[:200])
        requests.delete(fuzz_server.url + "/train/", timeout=REQUEST_TIMEOUT_S)
    assert_refused(r, text[:300])
    assert no_training_running(fuzz_server)


TRAIN_RAW = [
    ("/train/medsam2", "{not json"),
    ("/train/medsam2", "[1, 2, 3]"),
    ("/train/medsam2", "42"),
    ("/train/medsam2", '"epochs"'),
    ("/train/medsam2", "[" * 100_000 + "]" * 100_000),
    ("/train/medsam2", '{"a": ' * 3000 + "1" + "}" * 3000),
    ("/train/medsam2", json.dumps({"epochs": 1, "junk": "x" * (4 << 20)})),
    ("/train/no_such_model", "{}"),
    ("/train/", json.dumps({"medsam2": {"epochs": "many"}})),
    ("/train/", json.dumps({"medsam2": [1]})),
    ("/train/", json.dumps({"other": {}})),
]


def test_malformed_train_bodies_and_unknown_models(fuzz_server, train_guard):
    for path, text in TRAIN_RAW:
        r = post(fuzz_server, path, "train", data=text, headers={"Content-Type": "application/json"})
        if r.status_code < 400:
            train_guard.append(text[:200])
            requests.delete(fuzz_server.url + "/train/", timeout=REQUEST_TIMEOUT_S)
        assert_refused(r, (path, text[:100]))
    assert no_training_running(fuzz_server)
    check_alive(fuzz_server)


# ------------------------------------------------------------------------------------------ memory safety


@pytest.fixture(scope="module")
def small_limit_server(studies, random_checkpoint, tmp_path_factory):
    """A server whose --conf max_voxels is below ct_blob's 122,880 voxels (xray_2d's 4,096 fit)."""
    log = tmp_path_factory.mktemp("logs_small") / "server.log"
    srv = start_server(studies, {"checkpoint": str(random_checkpoint), "max_voxels": "100000"}, log)
    yield srv
    stop_server(srv)


def test_volume_over_max_voxels_is_refused_up_front(small_limit_server):
    srv = small_limit_server
    params = {"label": "lesion", "roi": [2, 20, 2, 20, 3, 3], "slice": 3}
    for model in ("medsam2_2d", "medsam2_3d"):
        r = infer(srv, model, params, "memory", image="ct_blob", timeout=SERVED_TIMEOUT_S)  # the first builds the model
        detail = assert_refused(r, model, statuses=(413,))
        assert "122,880" in detail and "100,000" in detail and "--conf max_voxels" in detail, detail
    # refused from the header, before decoding: this file's pixel data is missing, so decoding would answer 415
    truncated = huge_header_nifti((50, 50, 50))
    r = post(
        srv,
        "/infer/medsam2_2d?output=json",
        "memory",
        data={"params": json.dumps(params)},
        files={"file": ("big.nii", io.BytesIO(truncated), "application/octet-stream")},
    )
    detail = assert_refused(r, "truncated 125,000-voxel upload", statuses=(413,))
    assert "125,000" in detail and "--conf max_voxels" in detail, detail
    # what fits the limit is served
    r = infer(
        srv,
        "medsam2_2d",
        {"label": "lesion", "roi": [10, 40, 10, 40, 0, 0], "slice": 0},
        "memory",
        image="xray_2d",
        timeout=SERVED_TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    assert srv.alive()


def test_dicom_series_over_max_voxels_is_refused_before_decoding(tmp_path):
    """A DICOM series folder (how DICOMweb studies arrive) is measured from its first header and the file count,
    before any slice is decoded (only that check words its answer this way); within the limit it loads."""
    from lib.engine.prompts import PromptError
    from lib.imaging.volume_io import load_image

    source_ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # 128 x 128
    series = pydicom.uid.generate_uid()
    for k in range(20):
        ds = source_ds.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = series, pydicom.uid.generate_uid(), k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.save_as(str(tmp_path / f"slice{k:03d}.dcm"))
    CASES["memory"] += 2
    with pytest.raises(PromptError) as refused:
        load_image(tmp_path, max_voxels=128 * 128 * 20 - 1)
    message = str(refused.value)
    assert refused.value.status == 413 and "series has 20 slices and 327,680 voxels" in message, message
    assert "--conf max_voxels" in message
    assert load_image(tmp_path, max_voxels=128 * 128 * 20).array.shape == (20, 128, 128)


@pytest.mark.parametrize(
    "query",
    [
        "image=ct_blob&tag=..%2F..%2Fescaped",
        "image=ct_blob&tag=%2Ftmp%2Fescaped",
        "image=ct_blob&tag=.",
        "image=..%2F..%2Fescaped&tag=final",
        "image=%2Ftmp%2Fescaped&tag=final",
    ],
)
def test_label_saves_with_path_like_ids_or_tags_are_refused(fuzz_server, studies, tmp_path, query):
    """``PUT /datastore/label`` joins image id and tag into a path: path-like ones must not write anywhere."""
    label = tmp_path / "label.nii.gz"
    label.write_bytes((studies / "ct_blob.nii.gz").read_bytes())
    before = {p for p in studies.parent.rglob("*escaped*")}
    CASES["datastore label save"] += 1
    with label.open("rb") as f:
        r = requests.put(f"{fuzz_server.url}/datastore/label?{query}", files={"label": ("label.nii.gz", f)}, timeout=30)
    assert_refused(r, query, (400,))
    assert {p for p in studies.parent.rglob("*escaped*")} == before
    assert not Path("/tmp/escaped").exists()


def test_inference_may_not_save_a_final_label(fuzz_server):
    """``/infer`` needs only the user role; a final label is saved by an annotator with PUT /datastore/label."""
    params = {"label": "lesion", "roi": [10, 40, 10, 40, 5, 5], "slice": 5, "save_label": True, "label_tag": "final"}
    detail = assert_refused(infer(fuzz_server, "medsam2_2d", params, "infer save_label"), params, (403,))
    assert "PUT /datastore/label" in detail
