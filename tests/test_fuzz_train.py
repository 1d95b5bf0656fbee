"""Hostile and malformed ``/train`` bodies and unknown models: refused before a training process starts."""

from __future__ import annotations

import json
import math
import time

import pytest
import requests
from fuzz_testing import (
    FUZZ,
    REQUEST_TIMEOUT_S,
    assert_refused,
    check_alive,
    deeply_nested,
    not_a_flag,
    not_a_number,
    post,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

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
                        and k not in ("train_parts", "loss", "device", "gpus", "multi_gpu", "model", "client_id")
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
