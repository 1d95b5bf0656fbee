"""Shared parts of the fuzz tests (tests/test_fuzz_*.py), a pytest plugin of tests/conftest.py for its fixtures.

Every case must get a 4xx with a clear ``detail``: never a 500, a hang (requests time out), a file read outside
the datastore, a training run started, or a dead server (``/info/`` is asked after each batch). Hypothesis runs
a fixed, derandomized budget so CI is deterministic; the cases tried are counted and printed per file.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

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
    if not CASES:
        return
    lines = [f"fuzz cases tried: {sum(CASES.values())} in all"] + [f"  {k}: {v}" for k, v in sorted(CASES.items())]
    CASES.clear()
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
def bad_slice_range(draw):
    """A native ``slice_range`` that cannot be served on ct_blob (NK slices along k): partly or wholly outside the
    volume, not two slice numbers, or not a list."""
    kind = draw(st.sampled_from(["outside", "entry", "length", "type"]))
    if kind == "outside":
        low = draw(st.integers(-(10**6), NK - 1))
        return draw(st.sampled_from([[low, draw(st.integers(NK, 10**8))], [draw(st.integers(-(10**8), -1)), 3]]))
    if kind == "entry":
        return draw(st.permutations([2, draw(bad_coordinate)]))
    if kind == "length":
        return draw(st.lists(st.integers(0, NK - 1), min_size=1, max_size=5).filter(lambda v: len(v) != 2))
    return draw(not_a_list)


# ``changed_since`` that names no state of the fuzz session: not text, too long, control characters, or unknown ids
bad_changed_since = st.one_of(
    st.integers(),
    st.booleans(),
    st.lists(st.text(max_size=3), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), min_size=1, max_size=1),
    st.text(min_size=129, max_size=200),
    st.text(min_size=1, max_size=8).map(lambda t: t + "\n"),
    url_text(min_size=1, max_size=60).filter(lambda t: t != "empty"),
    st.sampled_from(["0" * 32 + ".1", "empty.0", "."]),
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
    mutations.append("changed_since")
    if dimension == 3:
        mutations += ["axis", "stop_patience", "stop_score", "flag"]
        if native:
            mutations.append("slice_range")
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
            if isinstance(params["slice"], int) and not isinstance(params["slice"], bool):
                # with an ROI a slice outside it is corrected (Slicer sends millimetres there): a click instead
                params.pop("roi", None)
                params["foreground"] = [[20, 20, 5]]
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
        elif mutation == "changed_since":
            params["changed_since"] = draw(bad_changed_since)
        elif mutation == "slice_range":
            params["slice_range"] = draw(bad_slice_range())
        elif mutation == "flag":
            params[draw(st.sampled_from(["stop_rule", "correction", "reset_state"]))] = draw(not_a_flag)
    if native and not isinstance(params.get("prompts"), list) and params.get("prompts") in (None, "", []):
        params["prompts"] = "none"
    return params


# ------------------------------------------------------------------------------------------------ /infer params
