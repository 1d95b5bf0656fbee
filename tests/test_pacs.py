"""Next to a PACS: a real Orthanc (DICOMweb) holds a CT series of real pixels; the app lists it, propagates on
it, saves final labels back as DICOM SEG (checked frame by frame against the source slices), reads them back
voxel for voxel (also on a cold cache, as the trainer does), and survives the PACS being slow or down."""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from pacs_testing import CtSeries, Orthanc, free_port, lung_ct, require, write_ct_series
from pydicom.uid import generate_uid
from replicas import nginx_binary, render_nginx_conf, start_nginx, wait_ready
from test_server_2d import split_multipart

from conftest import start_server, stop_server, wait_for_training
from sam2_testing import small_config_file

TIMEOUT_S = 4.0  # --conf dicomweb_timeout_s of the test server
LABEL_INFO = [{"name": "lesion", "idx": 1, "color": [255, 40, 40]}, {"name": "vessel", "idx": 3, "color": [0, 0, 255]}]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pacs")
    orthanc = Orthanc(folder / "orthanc").start()
    image = lung_ct()
    first = write_ct_series(image, folder / "ct1", patient_id="MEDSAM2-1")
    second = write_ct_series(lung_ct(first_slice=30, num_slices=8), folder / "ct2", patient_id="MEDSAM2-2")
    third = write_ct_series(lung_ct(first_slice=40, num_slices=6), folder / "ct3", patient_id="MEDSAM2-3")
    orthanc.upload(first.files[::-1] + second.files + third.files)  # any upload order
    yield orthanc, first, second, third
    orthanc.stop()


@pytest.fixture(scope="module")
def pacs_server(pacs, random_checkpoint, tmp_path_factory):
    orthanc = pacs[0]
    folder = tmp_path_factory.mktemp("pacs_server")
    conf = {
        "checkpoint": str(random_checkpoint),
        "model_config": str(small_config_file(folder)),
        "window": "lung",
        "dicomweb_timeout_s": str(TIMEOUT_S),
        "pacs_resend_every_s": "1",
    }
    env = {"MONAI_LABEL_DATASTORE_CACHE_PATH": str(folder / "cache")}
    server = start_server(orthanc.dicomweb, conf, folder / "server.log", env=env)  # type: ignore[arg-type]
    yield server
    stop_server(server)


def save_final(server, series_uid: str, label: sitk.Image, tmp: Path, label_info=LABEL_INFO) -> requests.Response:
    path = tmp / "label.nii.gz"
    sitk.WriteImage(label, str(path))
    with open(path, "rb") as f:
        return requests.put(
            f"{server.url}/datastore/label",
            params={"image": series_uid, "tag": "final"},
            files={"label": ("label.nii.gz", f)},
            data={"params": json.dumps({"label_info": label_info})},
            timeout=120,
        )


def designed_label(series: CtSeries, seed: int) -> np.ndarray:
    """Two labels (1 and 3) on some slices only, so empty slices and the slice order both matter."""
    arr = np.zeros(sitk.GetArrayViewFromImage(series.image).shape, np.uint8)
    n = arr.shape[0]
    k0 = seed % 3
    arr[k0 : k0 + max(2, n // 4), 90:150, 60:110] = 1
    arr[n - 3 : n - 1, 40 + seed : 60 + seed, 150:200] = 3
    arr[k0 + 1, 100:110, 70:80] = 0  # a hole: not a box per slice
    return arr


def as_image(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(like)
    return image


def srgb_to_cielab_dicom(rgb) -> list[int]:
    """sRGB (0-255) -> CIELab scaled to DICOM's 0-65535 (PS3.3 C.10.7.1.1), D65 white."""
    c = np.array(rgb, float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = [116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])]
    return [round(lab[0] * 65535 / 100), round((lab[1] + 128) * 65535 / 255), round((lab[2] + 128) * 65535 / 255)]


def check_seg_frames(seg: pydicom.Dataset, series: CtSeries, expected: np.ndarray, orthanc: Orthanc) -> None:
    """Every frame sits on a source slice (same ImagePositionPatient, referencing that slice's SOP instance) and
    equals the submitted label's voxels of its segment there; segments absent from a slice are empty there."""
    ct = {round(float(d.ImagePositionPatient[2]), 3): d for d in orthanc.instances_of_series(series.series_uid)}
    z_of_k = [round(p[2], 3) for p in sorted(series.ipp, key=lambda p: p[2])]  # k order = ascending z here
    frames = seg.pixel_array.reshape(-1, *expected.shape[1:])
    numbers = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    seen: set[tuple[int, int]] = set()
    for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ipp = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = z_of_k.index(round(ipp[2], 3))
        source = ct[round(ipp[2], 3)]
        assert np.allclose(ipp, [float(v) for v in source.ImagePositionPatient], atol=1e-3)
        derivation = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert derivation.ReferencedSOPInstanceUID == source.SOPInstanceUID
        value = {"lesion": 1, "vessel": 3}[str(numbers[segment].SegmentLabel)]
        assert np.array_equal(frames[index].astype(bool), expected[k] == value), (index, k, segment)
        seen.add((k, value))
    for value in (1, 3):
        for k in np.nonzero((expected == value).any(axis=(1, 2)))[0]:
            assert (int(k), value) in seen, f"slice {k} of label {value} has no frame"


def test_lists_the_series_and_propagates_in_its_geometry(pacs, pacs_server):
    orthanc, first, second, _ = pacs
    listing = pacs_server.get("/datastore/?output=all").json()
    assert {first.series_uid, second.series_uid} <= set(listing["objects"])
    r = pacs_server.post(
        f"/infer/medsam2_3d?image={first.series_uid}",
        data={"params": json.dumps({"label": "lesion", "foreground": [[120, 128, 10]], "client_id": "pacs"})},
    )
    assert r.status_code == 200, r.text
    label, _ = split_multipart(r)
    image = first.image
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
    assert np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    arr = sitk.GetArrayFromImage(label)
    assert arr[10].any() and set(np.unique(arr).tolist()) <= {0, 1}


def test_a_series_read_through_the_dicomweb_proxy_is_encoded_ahead(pacs, pacs_server):
    """OHIF reads a series through the app's proxy: the server downloads and encodes it in the background."""
    _, _, second, _ = pacs
    assert pacs_server.get("/datastore/?output=stats").status_code == 200  # the series listing is known
    metadata = f"/proxy/dicom/wado/studies/{second.study_uid}/series/{second.series_uid}/metadata"
    assert pacs_server.get(metadata, timeout=60).status_code == 200
    deadline = time.time() + 180
    while True:
        ahead = pacs_server.get("/info/").json()["encode_ahead"]["medsam2"]
        done = [j for j in ahead["finished"] if j["image"] == second.series_uid]
        if done or time.time() > deadline:
            break
        time.sleep(0.5)
    assert done and done[0]["source"] == "dicomweb" and done[0]["state"] == "done", ahead
    assert done[0]["encoded"] == done[0]["slices"] == second.image.GetSize()[2]
    seg_reads = [j for j in ahead["finished"] if j["image"] not in (second.series_uid,)]
    assert all(j["state"] != "failed" for j in seg_reads), ahead  # nothing but image series is opened


def test_final_label_is_stored_as_a_dicom_seg_of_the_series(pacs, pacs_server, tmp_path):
    orthanc, first, _, _ = pacs
    expected = designed_label(first, seed=1)
    r = save_final(pacs_server, first.series_uid, as_image(expected, first.image), tmp_path)
    assert r.status_code == 200, r.text
    segs = orthanc.series_of_modality("SEG")
    assert len(segs) == 1
    seg_uid = segs[0]["0020000E"]["Value"][0]
    (seg,) = orthanc.instances_of_series(seg_uid)
    assert seg.StudyInstanceUID == first.study_uid and seg.PatientID == "MEDSAM2-1"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.series_uid
    segments = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert set(segments) == {"lesion", "vessel"}
    for entry in LABEL_INFO:
        lab = [int(v) for v in segments[entry["name"]].RecommendedDisplayCIELabValue]
        assert np.allclose(lab, srgb_to_cielab_dicom(entry["color"]), atol=700), (entry, lab)
    check_seg_frames(seg, first, expected, orthanc)

    # the datastore's view: one final label, the submitted voxels, sent to the PACS
    listing = pacs_server.get("/datastore/?output=all").json()["objects"][first.series_uid]
    assert listing["labels"]["final"]["info"]["pacs_upload"]["status"] == "sent"
    assert listing["labels"]["final"]["info"]["SeriesInstanceUID"] == seg_uid
    back = pacs_server.get(f"/datastore/label?label={first.series_uid}&tag=final")
    assert back.status_code == 200
    path = tmp_path / "back.nii.gz"
    path.write_bytes(back.content)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), expected)


def cold_datalist(orthanc: Orthanc, cache: Path, unreadable: list[str] | None = None) -> list[dict]:
    """What a trainer on another machine (or after the cache is wiped) reads: the datastore on an empty cache."""
    from dicomweb_client import DICOMwebClient

    from lib.storage.pacs_datastore import PacsDatastore, TimeoutSession

    client = DICOMwebClient(orthanc.dicomweb, session=TimeoutSession(TIMEOUT_S))
    store = PacsDatastore(client, {"Modality": "CT"}, str(cache), {"lesion": 1, "organ": 2, "vessel": 3})
    items = store.datalist()
    if unreadable is not None:
        unreadable.extend(store.status().get("unreadable_segs", []))
    return items


def test_second_save_replaces_the_label_and_a_cold_cache_reads_the_newest_seg(pacs, pacs_server, tmp_path):
    orthanc, first, _, _ = pacs
    newer = designed_label(first, seed=7)
    assert not np.array_equal(newer, designed_label(first, seed=1))
    r = save_final(pacs_server, first.series_uid, as_image(newer, first.image), tmp_path)
    assert r.status_code == 200, r.text
    assert len(orthanc.series_of_modality("SEG")) == 2  # the PACS keeps both: its history
    objects = pacs_server.get("/datastore/?output=all").json()["objects"]
    assert sum("final" in o["labels"] for o in objects.values()) == 1
    back = pacs_server.get(f"/datastore/label?label={first.series_uid}&tag=final")
    path = tmp_path / "back.nii.gz"
    path.write_bytes(back.content)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), newer)

    items = cold_datalist(orthanc, tmp_path / "cold")
    assert len(items) == 1 and Path(items[0]["image"]).name == f"{first.series_uid}.nii.gz"
    label = sitk.ReadImage(items[0]["label"])
    image = sitk.ReadImage(items[0]["image"])
    assert label.GetSize() == image.GetSize() and np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(label), newer)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(first.image))


def test_trainer_trains_on_the_labels_read_from_the_segs(pacs, pacs_server):
    _, first, _, _ = pacs
    options = {"epochs": 1, "steps_per_epoch": 2, "clip_length": 3, "max_objects": 2}
    r = pacs_server.post("/train/medsam2", json=options)
    assert r.status_code == 200, r.text
    status = wait_for_training(pacs_server, 300)
    assert status.get("status") == "DONE", (status, pacs_server.log.read_text()[-3000:])
    stats = pacs_server.get("/info/").json()["train_stats"]["medsam2"]
    assert stats["train_studies"] == [f"{first.series_uid}.nii.gz"], stats


def test_bad_saves_are_refused_and_nothing_saved_is_lost(pacs, pacs_server, tmp_path):
    orthanc, first, second, _ = pacs
    wrong = sitk.Image([16, 16, 4], sitk.sitkUInt8)
    r = save_final(pacs_server, second.series_uid, wrong, tmp_path)
    assert r.status_code == 422 and "size" in r.json()["detail"], r.text
    empty = as_image(np.zeros(sitk.GetArrayViewFromImage(second.image).shape, np.uint8), second.image)
    r = save_final(pacs_server, second.series_uid, empty, tmp_path)
    assert r.status_code == 422 and "empty" in r.json()["detail"], r.text
    r = pacs_server.post("/infer/medsam2_3d?image=1.2.3.4.5", data={"params": json.dumps({"foreground": [[1, 1, 1]]})})
    assert r.status_code == 404 and "1.2.3.4.5" in r.json()["detail"], r.text
    assert len(orthanc.series_of_modality("SEG")) == 2


def test_an_unreadable_seg_from_another_tool_leaves_out_its_series_only(pacs, tmp_path):
    orthanc, first, second, _ = pacs
    (good,) = orthanc.instances_of_series(orthanc.series_of_modality("SEG")[-1]["0020000E"]["Value"][0])
    broken = copy.deepcopy(good)  # claims more frames than its pixel data holds
    broken.SeriesInstanceUID, broken.SOPInstanceUID = generate_uid(), generate_uid()
    broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID
    broken.StudyInstanceUID, broken.PatientID = second.study_uid, "MEDSAM2-2"
    broken.ReferencedSeriesSequence[0].SeriesInstanceUID = second.series_uid
    broken.NumberOfFrames = int(good.NumberOfFrames) * 4
    broken.SeriesTime = "235959.999999"
    path = tmp_path / "broken_seg.dcm"
    broken.save_as(str(path))
    orthanc.upload([path])

    unreadable: list[str] = []
    items = cold_datalist(orthanc, tmp_path / "cold", unreadable)
    assert [Path(i["image"]).name for i in items] == [f"{first.series_uid}.nii.gz"]
    assert len(unreadable) == 1 and broken.SeriesInstanceUID in unreadable[0] and "left out" in unreadable[0]


def test_a_slow_pacs_answers_503_within_the_timeout_and_the_server_stays_responsive(pacs, pacs_server, tmp_path):
    orthanc, _, _, third = pacs  # a series the server has not fetched yet
    orthanc.pause()
    try:
        start = time.time()
        r = pacs_server.post(
            f"/infer/medsam2_3d?image={third.series_uid}", data={"params": json.dumps({"foreground": [[9, 9, 2]]})}
        )
        took = time.time() - start
        assert r.status_code == 503 and "did not answer within" in r.json()["detail"], r.text
        assert "Retry-After" in r.headers and took < 4 * TIMEOUT_S + 10, took
        info = pacs_server.get("/info/", timeout=5)  # not blocked behind the hung PACS
        assert info.status_code == 200
        with ThreadPoolExecutor(1) as pool:  # a save waits for the PACS in its own thread, not the event loop
            label = as_image(np.ones(sitk.GetArrayViewFromImage(third.image).shape, np.uint8), third.image)
            saving = pool.submit(save_final, pacs_server, third.series_uid, label, tmp_path)
            time.sleep(1)
            start = time.time()
            assert pacs_server.get("/info/", timeout=5).status_code == 200 and time.time() - start < 2
            assert pacs_server.get("/datastore/?output=stats", timeout=5).status_code == 200
            saved = saving.result()
        assert saved.status_code == 503 and "did not answer within" in saved.json()["detail"], saved.text
        start = time.time()
        proxied = pacs_server.get("/proxy/dicom/qido/studies", timeout=60)
        assert proxied.status_code == 503 and time.time() - start < 2 * TIMEOUT_S + 10, proxied.text
    finally:
        orthanc.resume()
    r = pacs_server.post(
        f"/infer/medsam2_3d?image={third.series_uid}", data={"params": json.dumps({"foreground": [[120, 128, 3]]})}
    )
    assert r.status_code == 200, r.text
    assert pacs_server.get("/proxy/dicom/qido/studies").status_code == 200


def test_pacs_down_keeps_the_label_and_sends_it_when_the_pacs_is_back(pacs, pacs_server, tmp_path):
    orthanc, first, second, _ = pacs
    orthanc.stop()
    try:
        r = pacs_server.post(
            "/infer/medsam2_3d?image=1.2.826.0.1.3680043.8.498.1",
            data={"params": json.dumps({"foreground": [[1, 1, 1]]})},
        )
        assert r.status_code == 503 and "could not be reached" in r.json()["detail"], r.text
        info = pacs_server.get("/info/")
        assert info.status_code == 200 and "could not be reached" in info.json()["datastore"]["error"]
        ready = pacs_server.get("/health/ready")
        assert ready.status_code == 503 and "could not be reached" in " ".join(ready.json()["reasons"]), ready.text
        label = designed_label(second, seed=3)
        r = save_final(pacs_server, second.series_uid, as_image(label, second.image), tmp_path)  # image cached
        assert r.status_code == 502, r.text
        metrics = pacs_server.get("/metrics").text
        assert "medsam2_ready 0.0" in metrics and "medsam2_pacs_labels_not_sent 1.0" in metrics
        detail = r.json()["detail"]
        assert "saved on the MONAI Label server" in detail and "sent again" in detail
        kept = pacs_server.get(f"/datastore/label?label={second.series_uid}&tag=final")
        assert kept.status_code == 200
        path = tmp_path / "kept.nii.gz"
        path.write_bytes(kept.content)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), label)
    finally:
        back = Orthanc(orthanc.folder, http_port=orthanc.http_port).start()
        pacs[0].proc = back.proc  # the module fixture stops this one
    deadline = time.time() + 60
    while time.time() < deadline:  # the server sends it by itself (pacs_resend_every_s)
        objects = pacs_server.get("/datastore/?output=all").json()["objects"]
        info = objects[second.series_uid]["labels"]["final"]["info"]
        if info["pacs_upload"]["status"] == "sent":
            break
        time.sleep(1)
    assert info["pacs_upload"]["status"] == "sent", pacs_server.log.read_text()[-3000:]
    (seg,) = back.instances_of_series(info["SeriesInstanceUID"])
    assert seg.StudyInstanceUID == second.study_uid
    check_seg_frames(seg, second, label, back)
    assert pacs_server.get("/info/").json()["datastore"]["labels_not_sent"] == 0


def test_replicas_behind_nginx_share_the_pacs(pacs, pacs_server, random_checkpoint, tmp_path):
    """A second replica with its own cache, both behind nginx: a label saved through nginx (on either replica)
    is read back by both from the PACS's SEG, voxel for voxel."""
    require([nginx_binary()], "nginx (Debian nginx)")
    orthanc, _, _, third = pacs
    conf = {"checkpoint": str(random_checkpoint), "model_config": str(small_config_file(tmp_path)), "window": "lung"}
    conf |= {"dicomweb_timeout_s": str(TIMEOUT_S), "pacs_resend_every_s": "1", "replica_name": "r2"}
    env = {"MONAI_LABEL_DATASTORE_CACHE_PATH": str(tmp_path / "cache")}
    second = start_server(orthanc.dicomweb, conf, tmp_path / "r2.log", env=env)  # type: ignore[arg-type]
    port = free_port()
    upstreams = [s.url[len("http://") :] for s in (pacs_server, second)]
    nginx = start_nginx(render_nginx_conf(f"127.0.0.1:{port}", upstreams, tmp_path / "nginx"))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 60)
        label = designed_label(third, seed=11)
        r = save_final(SimpleNamespace(url=url), third.series_uid, as_image(label, third.image), tmp_path)
        assert r.status_code == 200, r.text
        for server in (pacs_server, second):
            deadline = time.time() + 30  # the other replica sees the new SEG at its next PACS refresh (1 s here)
            while (back := server.get(f"/datastore/label?label={third.series_uid}&tag=final")).status_code == 404:
                assert time.time() < deadline, (server.url, back.text)
                time.sleep(0.5)
            assert back.status_code == 200, (server.url, back.text)
            path = tmp_path / "back.nii.gz"
            path.write_bytes(back.content)
            assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), label), server.url
            assert server.get("/health/ready").status_code == 200
            assert "medsam2_pacs_labels_not_sent 0.0" in server.get("/metrics").text
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
        stop_server(second)
