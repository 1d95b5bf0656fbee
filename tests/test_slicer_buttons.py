"""The MONAI Label 3D Slicer plugin's buttons other than inference, and ``monailabel.client.MONAILabelClient``,
replayed against the real server: Next Sample, uploading the volume, Submit Label, Train, the training status the
plugin polls, and Stop Training.

The requests go through the plugin's own ``MONAILabelClient`` (``MONAILabelLib/client.py``), made as
``MONAILabelLogic._client`` makes it (lines 2324-2348 of the 0.8.5 ``MONAILabel.py``: server URL, temp folder,
``client_id``, then ``GET /auth/``), so URL, query string, multipart body and the ``client_id`` that the client adds
to every body are the plugin's. The parameters that the button handlers build are reproduced below, each with the
plugin lines it follows. Both clients add ``client_id`` to the ``/train`` body, which the server once refused (422
``unknown train option(s) ['client_id']``), so Slicer's Train button could not start a run.

Training runs use the server's training defaults (``--conf epochs 1`` etc.), which ``/info/`` shows and the Train
button sends back; the runs that a test stops are given many epochs, and every test waits until no run is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import slicer_plugin as plugin
import torch
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from test_training import learnable_volume

from conftest import Server, start_server, stop_server, write_image
from lib.engine.checkpoints import build_model, save_checkpoint
from lib.training.options import check_train_body, parse_train_settings
from lib.training.settings import TrainSettings
from sam2_testing import small_config_file

CLIENT_ID = "user-xyz"  # MONAILabelLogic.setClientId's default (line 2302)
PYTHON_CLIENT_ID = "radiologist-7"  # MONAILabelClient(url, client_id=...) as a script would make it
SHAPE = (12, 48, 48)  # (k, j, i)
GEOMETRY = {"spacing": (0.9, 1.1, 3.0), "origin": (40.0, -25.0, 310.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, -1)}
LABELLED = ("case0", "case1", "case2")  # final labels from the start: what training trains on
UNLABELLED = ("case3", "case4", "case5")  # case5 is only ever labelled by the Submit Label test
# the training defaults the server starts with: the Train button sends them back, so a run takes seconds
TINY_TRAINING = {"epochs": "1", "steps_per_epoch": "1", "clip_length": "2", "max_objects": "1"}
LONG_RUN = {"epochs": "1000", "steps_per_epoch": "1000"}  # options table edits for a run that a test stops
TRAINER = "medsam2"
RUN_TIMEOUT_S = 600
SECTIONS = {"infer": "models", "train": "trainers", "activelearning": "strategies", "scoring": "scoring"}


# ------------------------------------------------------------------------------------ the plugin's parameters


def params_from_config(info: dict[str, Any], section: str, name: str, edits: dict[str, str] | None = None) -> dict:
    """``getParamsFromConfig(section, name)`` (lines 892-900) after ``invalidateConfigTable`` (lines 789-823) wrote
    the options table back into the ``/info/`` config: a value the user typed into the table (``edits``, as text)
    is converted to the type of the config value (lines 811-819); a list value is sent as its first element."""
    config = json.loads(json.dumps(info.get(SECTIONS.get(section, section), {}).get(name, {}).get("config", {})))
    for key, text in (edits or {}).items():
        v = config[key]
        if isinstance(v, bool):
            value: Any = True if text else False
        elif isinstance(v, int):
            value = int(text) if text else 0
        elif isinstance(v, float):
            value = float(text) if text else 0.0
        elif isinstance(v, list):
            v.remove(text)
            v.insert(0, text)
            value = v
        else:
            value = text
        config[key] = value
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}


def save_label_info(info: dict[str, Any]) -> list[dict[str, Any]]:
    """``onSaveLabel``'s ``label_info`` (lines 1476-1486): one entry per segment of the segmentation node, which
    ``initSample`` creates from ``/info/`` labels in order (``updateSegmentationMask(None, labels)``), less the
    background and scribbles segments; ``idx`` is the segment's position + 1."""
    segments = list(info["labels"])
    skipped = ("background", "foreground_scribbles", "background_scribbles")
    return [{"name": name, "idx": idx + 1} for idx, name in enumerate(segments) if name not in skipped]


# ----------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def button_studies(tmp_path_factory) -> Path:
    """Six learnable volumes, three with final labels (training data), three unlabelled."""
    root = tmp_path_factory.mktemp("button_studies")
    (root / "labels" / "final").mkdir(parents=True)
    for seed, name in enumerate(LABELLED + UNLABELLED):
        frames, label = learnable_volume(seed, shape=SHAPE)
        write_image(frames.astype(np.int16), root / f"{name}.nii.gz", **_geometry())
        if name in LABELLED:
            write_image(label, root / "labels" / "final" / f"{name}.nii.gz", **_geometry())
    return root


def _geometry() -> dict[str, tuple[float, ...]]:
    return {k: tuple(map(float, v)) for k, v in GEOMETRY.items()}


@pytest.fixture(scope="module")
def button_server(button_studies, tmp_path_factory) -> Iterator[Server]:
    """The real server with a random 128-input model and tiny training defaults."""
    folder = tmp_path_factory.mktemp("button_server")
    config = small_config_file(folder)
    torch.manual_seed(0)
    checkpoint = folder / "random_small.pt"
    save_checkpoint(build_model(config), checkpoint)
    conf = {"checkpoint": str(checkpoint), "model_config": str(config), "window": "128,256", **TINY_TRAINING}
    server = start_server(button_studies, conf, folder / "server.log")
    try:
        yield server
    finally:
        try:
            _stop_any_run(server)
        finally:
            stop_server(server)


def _training_running(server: Server) -> bool:
    return server.get("/train/?check_if_running=true").status_code == 200


def _stop_any_run(server: Server) -> None:
    if _training_running(server):
        requests.delete(server.url + "/train/", timeout=60)
    wait_until(lambda: not _training_running(server), 60, "the training process to end")


@pytest.fixture
def no_run_left(button_server) -> Iterator[Server]:
    """For the tests that start training: none runs before, and none is left after (stopped if it is)."""
    _stop_any_run(button_server)
    yield button_server
    left = _training_running(button_server)
    _stop_any_run(button_server)
    assert not left, "the test left a training run going"


@pytest.fixture(scope="module")
def client_module() -> Any:
    return plugin.plugin_client_module()


class PluginLogic:
    """``MONAILabelLogic`` (lines 2267-2400) as far as these buttons use it: each call makes a new client with
    ``_client`` (lines 2324-2348: server URL, temp folder, ``client_id``, then ``GET /auth/``; authentication is
    off here, so no login dialog and no token) and passes the arguments on as the plugin does."""

    def __init__(self, client_module: Any, server_url: str, tmpdir: str, client_id: str = CLIENT_ID):
        self.client_module, self.server_url, self.tmpdir, self.client_id = client_module, server_url, tmpdir, client_id

    def _client(self) -> Any:
        client = self.client_module.MONAILabelClient(self.server_url, self.tmpdir, self.client_id)
        assert client.auth_enabled() is False
        return client

    def info(self) -> dict[str, Any]:
        return self._client().info()

    def datastore(self) -> dict[str, Any]:
        return self._client().datastore()

    def download_label(self, label_id: str, tag: str) -> str:
        return self._client().download_label(label_id, tag)

    def next_sample(self, strategy: str, params: dict[str, Any]) -> dict[str, Any]:
        return self._client().next_sample(strategy, params)

    def upload_image(self, image_in: str, image_id: str | None = None) -> dict[str, Any]:
        return self._client().upload_image(image_in, image_id)

    def save_label(self, image_in: str, label_in: str, params: dict[str, Any]) -> dict[str, Any]:
        return self._client().save_label(image_in, label_in, params=params)

    def train_start(self, model: str | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._client().train_start(model, params if params is not None else {})

    def train_status(self, check_if_running: bool) -> Any:
        return self._client().train_status(check_if_running)

    def train_stop(self) -> Any:
        return self._client().train_stop()


@pytest.fixture
def logic(button_server, client_module, tmp_path) -> PluginLogic:
    return PluginLogic(client_module, button_server.url, str(tmp_path))


@pytest.fixture
def info(logic) -> dict[str, Any]:
    """``fetchInfo`` (lines 1093-1133): ``/info/`` through the plugin's client."""
    return logic.info()


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"waited {timeout_s}s for {what}")
        time.sleep(0.5)


def listing(client: Any) -> dict[str, Any]:
    """``GET /datastore/?output=all`` (``MONAILabelClient.datastore``): image id -> its entry."""
    return client.datastore()["objects"]


def unlabelled_ids(client: Any) -> set[str]:
    return {image_id for image_id, entry in listing(client).items() if "final" not in entry.get("labels", {})}


def server_log_tail(server: Server) -> str:
    return server.log.read_text()[-3000:]


# ------------------------------------------------------------------------------------------------ the options


def test_client_id_is_accepted_and_changes_no_training_setting():
    defaults = TrainSettings(epochs=3)
    for client_id in (CLIENT_ID, None, "", "x" * 256):
        body = {"client_id": client_id, "epochs": 2}
        check_train_body(body, defaults)
        assert parse_train_settings(body, defaults) == dataclasses.replace(defaults, epochs=2)
    check_train_body({"client_id": CLIENT_ID}, defaults)
    assert parse_train_settings({"client_id": CLIENT_ID}, defaults) == defaults
    for bad in (5, ["a"], {"a": 1}, True, "x" * 257):
        with pytest.raises(ValueError, match="client_id names the client"):
            check_train_body({"client_id": bad}, defaults)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/train/medsam2", {"client_id": 5}),
        ("/train/medsam2", {"client_id": "x" * 300}),
        ("/train/medsam2", {"client_id": CLIENT_ID, "epochs": 0}),
        ("/train/", {"client_id": {"nested": 1}}),
        ("/train/", {"client_id": CLIENT_ID, "medsam2": {"epochs": "many"}}),
    ],
    ids=["int", "too long", "with a bad option", "all models, not a string", "all models, bad option"],
)
def test_a_bad_client_id_or_option_next_to_it_is_refused_before_a_run_starts(no_run_left, path, body):
    r = no_run_left.post(path, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "client_id" in detail or "epochs" in detail, detail
    assert not _training_running(no_run_left)
    assert no_run_left.get("/train/").status_code == 404  # no task was even queued


# --------------------------------------------------------------------------------------------------- buttons


def test_next_sample_button_returns_an_unlabelled_image_the_plugin_loads(logic, info, button_server):
    """``onNextSampleButton`` (lines 1242-1322) with each strategy the plugin lists (the strategy box holds
    ``/info/`` strategies, the first selected by default, lines 622-626): ``next_sample(strategy, config)``, then
    the image loaded from ``path`` when it is local or else downloaded from ``/datastore/image?image=<id>``, and
    the datastore asked for an original label (lines 1297-1318)."""
    strategies = list(info["strategies"])
    assert strategies[0] == "random" and "first" in strategies and len(strategies) >= 3, strategies
    unlabelled = unlabelled_ids(logic)
    assert set(UNLABELLED) - {"case5"} <= unlabelled
    for strategy in strategies:
        sample = logic.next_sample(strategy, params_from_config(info, "activelearning", strategy))
        assert sample.get("id") in unlabelled, (strategy, sample, sorted(unlabelled))
        image_id = sample["id"]
        if strategy == "first":
            assert image_id == sorted(unlabelled)[0]
        assert Path(sample["path"]).is_file()  # Slicer on the server's machine loads it from here (line 1286)
        # another machine downloads it (lines 1290-1295)
        r = requests.get(f"{button_server.url}/datastore/image?image={quote_plus(image_id)}", timeout=60)
        assert r.status_code == 200, r.text[:300]
        assert hashlib.sha256(r.content).digest() == hashlib.sha256(Path(sample["path"]).read_bytes()).digest()
        # the plugin's original-label lookup: the image is in the listing, with no label of either tag
        entry = listing(logic)[image_id]
        assert "original" not in entry["labels"] and "final" not in entry["labels"], entry


@pytest.mark.parametrize("node_name", ["SlicerUpload", "2: CT Chest"], ids=["plain", "DICOM series name"])
def test_upload_image_button_adds_the_volume_under_its_node_name(logic, button_server, tmp_path, node_name):
    """``onUploadImage`` (lines 1391-1437): the scene's volume saved to a temporary ``.nii.gz`` (``file_ext``,
    line 243) and sent with ``upload_image(in_file, image_id)`` where the id is the volume node's name (Slicer
    names a volume loaded from DICOM "<series number>: <series description>")."""
    frames, _ = learnable_volume(40, shape=SHAPE)
    in_file = tempfile.NamedTemporaryFile(suffix=".nii.gz", dir=tmp_path).name
    write_image(frames.astype(np.int16), Path(in_file), **_geometry())
    count = len(listing(logic))
    answer = logic.upload_image(in_file, node_name)
    assert answer == {"image": node_name}, answer
    assert len(listing(logic)) == count + 1
    entry = listing(logic)[node_name]
    assert entry["labels"] == {}, entry
    assert node_name in unlabelled_ids(logic)
    r = requests.get(f"{button_server.url}/datastore/image?image={quote_plus(node_name)}", timeout=60)
    assert r.status_code == 200, r.text[:300]
    downloaded = tmp_path / "downloaded.nii.gz"
    downloaded.write_bytes(r.content)
    got = sitk.ReadImage(str(downloaded))
    assert (sitk.GetArrayFromImage(got) == frames.astype(np.int16)).all()
    assert np.allclose(got.GetDirection(), GEOMETRY["direction"]) and np.allclose(got.GetOrigin(), GEOMETRY["origin"])
    # uploading the same node again (the plugin uploads before each save of a session volume) replaces it
    again = logic.upload_image(in_file, node_name)
    assert again == {"image": node_name} and len(listing(logic)) == count + 1


def test_submit_label_button_saves_the_final_label_and_next_sample_skips_it(logic, info, tmp_path):
    """``onSaveLabel`` (lines 1452-1530): the segments exported to a labelmap on the volume's geometry, saved to a
    temporary ``.nii.gz`` and sent with ``save_label(id, label_in, {"label_info": ...})`` (no tag: the server's
    default, final); then ``fetchInfo`` (line 1508) whose ``datastore`` counts drive the progress bar (lines
    610-614). Next Sample with ``first`` no longer offers the image."""
    image_id = "case5"
    before = logic.info()["datastore"]
    _, label = learnable_volume(UNLABELLED.index(image_id) + len(LABELLED), shape=SHAPE)
    label_in = tempfile.NamedTemporaryFile(suffix=".nii.gz", dir=tmp_path).name
    write_image(label, Path(label_in), **_geometry())
    label_info = save_label_info(info)
    assert label_info and label_info[0] == {"name": info["labels"][0], "idx": 1}

    result = logic.save_label(image_id, label_in, {"label_info": label_info})
    assert result.get("image") == image_id, result
    after = logic.info()["datastore"]  # fetchInfo
    assert after["completed"] == before["completed"] + 1 and after["total"] == before["total"], (before, after)
    final = listing(logic)[image_id]["labels"]["final"]
    assert final["info"]["label_info"] == label_info and final["info"]["client_id"] == CLIENT_ID, final
    downloaded = logic.download_label(image_id, "final")
    assert Path(downloaded).read_bytes() == Path(label_in).read_bytes()
    assert image_id not in unlabelled_ids(logic)
    for _ in range(3):
        sample = logic.next_sample("first", params_from_config(info, "activelearning", "first"))
        assert sample.get("id") != image_id, sample


def _monitor_training(logic: PluginLogic, timeout_s: float) -> tuple[dict, list[dict]]:
    """``monitorTraining`` (lines 487-516, every 5 s while a run goes): ``train_status(False)``; while RUNNING,
    ``/info/`` and the first trainer's ``train_stats`` (epoch, total_epochs, total_time). Returns the last status
    and the stats seen while it ran."""
    seen: list[dict] = []
    deadline = time.time() + timeout_s
    while True:
        status = logic.train_status(False)
        if status.get("status") not in ("SUBMITTED", "RUNNING") or time.time() > deadline:
            return status, seen
        if status["status"] == "RUNNING":
            train_stats = logic.info().get("train_stats")
            if train_stats:
                seen.append(next(iter(train_stats.values())))
        time.sleep(1)


@pytest.mark.slow
def test_train_button_starts_a_run_with_the_trainer_config_and_the_status_follows_it_to_the_end(
    no_run_left, logic, info
):
    """``onTraining`` (lines 1160-1200): the trainer box's first trainer (lines 629-634),
    ``train_start(model, getParamsFromConfig("train", model))`` with the ``client_id`` the client adds; then
    ``updateGUIFromParameterNode`` asks ``isTrainingRunning()`` (``train_status(check_if_running=True)``,
    lines 644-651) and ``monitorTraining`` follows the run until it ends."""
    model = next(iter(info["trainers"]))
    assert model == TRAINER
    params = params_from_config(info, "train", model)
    assert params["epochs"] == 1 and params["multi_gpu"] is False and params["gpus"] == "all", params
    assert not logic.train_status(True)  # the Train button is enabled: nothing runs

    status = logic.train_start(model, params)
    assert status["status"] in ("SUBMITTED", "RUNNING") and status.get("id") and status.get("start_ts"), status
    assert status["request"]["client_id"] == CLIENT_ID and status["request"]["model"] == model
    wait_until(lambda: logic.train_status(True), 60, "the training process to start")

    final, seen = _monitor_training(logic, RUN_TIMEOUT_S)
    assert final["id"] == status["id"] and final["status"] == "DONE", (final, server_log_tail(no_run_left))
    assert final.get("end_ts"), final
    assert not logic.train_status(True)  # the plugin re-enables Train and disables Stop
    stats = logic.info()["train_stats"][model]
    assert stats["status"] == "DONE" and stats["total_epochs"] == 1 and len(stats["epochs"]) == 1, stats
    assert stats["best_metric"] == stats["best_dice"]  # the plugin's accuracy bar reads best_metric
    expected = dataclasses.asdict(TrainSettings(**{k: v for k, v in params.items() if k in stats["settings"]}))
    assert stats["settings"] == expected  # the run used what the button sent, and client_id changed nothing
    assert Path(stats["checkpoint_start"]).parent == no_run_left.log.parent, stats  # this server's run
    # what the progress bar showed while it ran (a stats file another server wrote may show until the run writes)
    assert all(s["total_epochs"] == 1 for s in seen if s.get("status") == "RUNNING"), seen


def _start_long_run(client: Any, model: str | None, params: dict[str, Any]) -> dict[str, Any]:
    status = client.train_start(model, params)
    return status[TRAINER]["result"] if model is None else status


@pytest.mark.slow
def test_stop_training_button_stops_the_run_and_the_stats_say_interrupted(no_run_left, logic, info):
    """``onStopTraining`` (lines 1202-1234): ``train_stop()``, whose answer the plugin shows as status, start and
    end time and the last line of ``details`` (``status.get("details", [])[-1]`` is evaluated whether or not there
    is a ``result``, so an empty ``details`` would raise in Slicer). The run was started with the options table
    edited to many epochs (``invalidateConfigTable``)."""
    params = params_from_config(info, "train", TRAINER, LONG_RUN)
    assert params["epochs"] == 1000 and params["steps_per_epoch"] == 1000
    t0 = time.time()
    started = _start_long_run(logic, TRAINER, params)

    def run_under_way() -> bool:
        """The process runs and printed, and this run (not one before it) wrote its RUNNING stats."""
        status = logic.train_status(False)
        stats = logic.info().get("train_stats", {}).get(TRAINER, {})
        ours = stats.get("started", 0) >= t0 and stats.get("total_epochs") == 1000
        return bool(status.get("details")) and stats.get("status") == "RUNNING" and ours

    wait_until(run_under_way, 120, "the run to write its RUNNING stats")
    assert logic.train_status(True)
    stopped = logic.train_stop()
    assert stopped["id"] == started["id"] and stopped["status"] == "STOPPED", stopped
    assert stopped["start_ts"] and stopped["end_ts"] and stopped["details"], stopped
    assert stopped.get("result", stopped.get("details", [])[-1])  # the plugin's message (line 1226)
    assert not logic.train_status(True)
    last = logic.train_status(False)
    assert last["id"] == started["id"] and last["status"] == "STOPPED", last
    stats = logic.info()["train_stats"][TRAINER]
    assert stats["status"] == "INTERRUPTED", stats  # the killed run never wrote its end
    assert logic.train_stop() is None  # Stop again: nothing to stop, no error


@pytest.mark.slow
def test_submit_label_with_auto_update_model_stops_the_run_and_starts_a_new_one(no_run_left, logic, info, tmp_path):
    """``onSaveLabel`` with the "Auto-update model" setting (``MONAILabel/autoUpdateModelV2``, lines 1510-1516):
    after saving, ``isTrainingRunning(check_only=True)``, ``train_stop()`` when a run goes, then ``onTraining``."""
    first = _start_long_run(logic, TRAINER, params_from_config(info, "train", TRAINER, LONG_RUN))
    wait_until(lambda: logic.train_status(True), 60, "the first run's process to start")
    label_in = tempfile.NamedTemporaryFile(suffix=".nii.gz", dir=tmp_path).name
    _, label = learnable_volume(0, shape=SHAPE)
    write_image(label, Path(label_in), **_geometry())
    saved = logic.save_label("case0", label_in, {"label_info": save_label_info(info)})
    assert saved.get("image") == "case0", saved
    assert logic.train_status(True)
    stopped = logic.train_stop()
    assert stopped["id"] == first["id"] and stopped["status"] == "STOPPED", stopped
    second = logic.train_start(TRAINER, params_from_config(info, "train", TRAINER))
    assert second["id"] != first["id"] and second["request"]["epochs"] == 1, second
    final, _ = _monitor_training(logic, RUN_TIMEOUT_S)
    assert final["id"] == second["id"] and final["status"] == "DONE", (final, server_log_tail(no_run_left))


@pytest.mark.slow
def test_monailabel_python_client_with_a_client_id_starts_shows_and_stops_training(no_run_left):
    """``monailabel.client.MONAILabelClient(url, client_id=...)``, as a new user scripts it: ``train_start`` (which
    adds ``client_id`` to the body) starts a run, ``train_status`` shows it, ``train_stop`` stops it; the same with
    ``train_start(None, {model: options})``, which posts to ``POST /train/`` (every trainer)."""
    client = MONAILabelClient(no_run_left.url, client_id=PYTHON_CLIENT_ID)
    assert client.train_status(check_if_running=True) is False
    for model, params in (
        (TRAINER, {"epochs": 1000, "steps_per_epoch": 1000}),
        (None, {TRAINER: {"epochs": 1000, "steps_per_epoch": 1000}}),
    ):
        started = _start_long_run(client, model, params)
        assert started["status"] in ("SUBMITTED", "RUNNING") and started["request"]["client_id"] == PYTHON_CLIENT_ID
        assert started["request"]["model"] == TRAINER and started["request"]["epochs"] == 1000, started
        wait_until(lambda: client.train_status(check_if_running=True), 60, "the training process to start")
        shown = client.train_status()
        assert shown["id"] == started["id"] and shown["status"] == "RUNNING", shown
        assert [t["id"] for t in no_run_left.get("/train/?all=true").json()][-1] == started["id"]
        stopped = client.train_stop()
        assert stopped["id"] == started["id"] and stopped["status"] == "STOPPED", stopped
        assert client.train_status(check_if_running=True) is False
        assert client.train_status()["status"] == "STOPPED"

    # a run to its end, with no client_id at all (the client then sends "client_id": null)
    anonymous = MONAILabelClient(no_run_left.url)
    started = anonymous.train_start(TRAINER, {"epochs": 1})
    assert "client_id" in started["request"] and started["request"]["client_id"] is None, started
    wait_until(lambda: anonymous.train_status().get("status") not in ("SUBMITTED", "RUNNING"), RUN_TIMEOUT_S, "the run")
    final = anonymous.train_status()
    assert final["id"] == started["id"] and final["status"] == "DONE", (final, server_log_tail(no_run_left))


def test_monailabel_client_train_start_with_monai_labels_own_option_names(no_run_left):
    """``MONAILabelClient.train_start(model, {"max_epochs": n})``, MONAI Label's documented call, runs n epochs
    (it was a 422: the option is ``epochs`` here); MONAI Label's options that mean nothing here are refused, with the
    reason, before a run starts."""
    client = MONAILabelClient(no_run_left.url, client_id=PYTHON_CLIENT_ID)
    with pytest.raises(MONAILabelClientException, match="train option name has no equivalent here"):
        client.train_start(TRAINER, {"max_epochs": 2, "name": "train_01"})
    assert client.train_status(check_if_running=True) is False
    started = client.train_start(TRAINER, {"max_epochs": 2})
    assert started["request"]["max_epochs"] == 2, started
    wait_until(lambda: client.train_status().get("status") not in ("SUBMITTED", "RUNNING"), RUN_TIMEOUT_S, "the run")
    final = client.train_status()
    assert final["id"] == started["id"] and final["status"] == "DONE", (final, server_log_tail(no_run_left))
    stats = client.info()["train_stats"][TRAINER]
    assert stats["total_epochs"] == 2 and stats["settings"]["epochs"] == 2 and len(stats["epochs"]) == 2, stats
