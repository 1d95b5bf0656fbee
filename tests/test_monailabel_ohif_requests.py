"""The exact requests the OHIF panel of MONAI Label 0.8.5 (its ``monai-label`` extension, in the OHIF build the
monailabel wheel bundles) sends, answered by this app on a real Orthanc. The app serves its own OHIF at /ohif/
(``tests/test_ohif_panel.py``); sites that build MONAI Label's OHIF plugin themselves still send these.

The panel's source is the monailabel wheel's ``.venv/monailabel/plugins/ohifv3/extensions/monai-label/src``
(file:line references below are into that folder). What OHIF does, as read there and in the bundled
``monailabel/endpoints/static/ohif/app-config.js``:

- DICOMweb goes through MONAI Label's proxy with server-relative URLs (``qidoRoot``/``wadoRoot``
  ``/proxy/dicom/qido`` and ``/proxy/dicom/wado``), so the viewer works on whatever port the server listens on.
- The panel's server URL is separate: the cookie ``MONAILABEL_SERVER_URL``, default ``http://<page host>:8000/``
  (components/SettingsTable.tsx:25-28). A server on another port needs that cookie (or the URL typed into the
  panel and "connect" pressed); the test sets the cookie, as the panel itself does (SettingsTable.tsx:45-46).
- The viewer route is ``/ohif/monai-label?StudyInstanceUIDs=<uid>`` (modes/monai-label routeName 'monai-label').
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from pacs_testing import CtSeries, Orthanc, lung_ct, write_ct_series

from conftest import Server, start_server, stop_server
from sam2_testing import small_config_file

CLICK_SLICE = 10
FOREGROUND = [[150, 120, CLICK_SLICE]]  # (i, j, k) voxel indices, as the panel computes them (see below)
BACKGROUND = [[20, 20, CLICK_SLICE]]
LABEL = {"name": "nodule", "value": 1, "color": [255, 0, 0]}


@dataclass
class PacsApp:
    orthanc: Orthanc
    ct: CtSeries
    server: Server


@pytest.fixture(scope="module")
def pacs_app(tmp_path_factory, random_checkpoint) -> Iterator[PacsApp]:
    """Orthanc holding the lung CT series, and the app serving it through its DICOMweb datastore."""
    tmp = tmp_path_factory.mktemp("ohif")
    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        ct = write_ct_series(lung_ct(), tmp / "ct")
        orthanc.upload(ct.files)
        conf = {
            "checkpoint": str(random_checkpoint),
            "model_config": str(small_config_file(tmp)),
            "window": "lung",
            # no spaces: the `monailabel` launcher script re-splits its arguments ($* unquoted)
            "labels": json.dumps({LABEL["name"]: LABEL["value"]}, separators=(",", ":")),
        }
        # start_server passes its studies argument on to --studies: a DICOMweb URL selects MONAI Label's
        # DICOMweb datastore (image id = SeriesInstanceUID)
        server = start_server(orthanc.dicomweb, conf, tmp / "server.log")
        try:
            yield PacsApp(orthanc, ct, server)
        finally:
            stop_server(server)
    finally:
        orthanc.stop()


def read_label(content: bytes) -> sitk.Image:
    """A label file from an /infer answer, NRRD or (gzipped) NIfTI, told apart by its first bytes."""
    suffix = ".nrrd" if content[:4] == b"NRRD" else ".nii.gz" if content[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(content)
        f.flush()
        return sitk.ReadImage(f.name)


def panel_point_prompt_infer(
    server: Server, model: str, image: str, foreground: list[list[int]], background: list[list[int]]
) -> requests.Response:
    """``POST /infer/<model>`` exactly as the panel's Point Prompts tab sends it for a ``deepgrow`` model.

    - URL: ``infer/`` + encodeURIComponent(model), query ``image`` then ``output=image``
      (services/MonaiLabelClient.js:29-31, ``output='image'`` default at :26); ``image`` is
      ``displaySet.SeriesInstanceUID`` of the active viewport (components/actions/PointPrompts.tsx:167-169).
    - Body: multipart form with the one field ``params`` (JSON), no file (MonaiLabelClient.js:43-49 ->
      ``api_post`` form=true -> ``constructFormData`` :106-119); header ``accept: application/json,
      multipart/form-data`` (:171-173); the answer is read as an arraybuffer (:48).
    - ``params``: the model's options from "Options / Configurations" (none unless the user saved some,
      PointPrompts.tsx:126-128, MonaiLabelPanel.tsx:402-404), ``foreground`` = the clicks of the selected
      label and ``background`` = the clicks of the 'background' row (PointPrompts.tsx:147-164), each
      ``worldToIndex(point).map(Math.round)``, i.e. (i, j, k) of the viewport's volume (:102, :120); for a
      ``dimension == 2`` model only the clicks on the slice of the last click (:153-161). No ``label``, no
      ``client_id``. Then ``result_extension='.nrrd'``, ``result_dtype='uint8'``, ``result_compress=false``
      (MonaiLabelClient.js:26, :34-38) and ``restore_label_idx=false`` (:41).
    - Answer: status 200 expected (PointPrompts.tsx:173); the body is parsed as NRRD by nrrd.js
      (MonaiLabelPanel.tsx:280 -> utils/SegmentationReader.js:18-39) and used as a Uint8Array of the
      labelmap's voxels (MonaiLabelPanel.tsx:315), any non-zero value becoming the selected segment because the
      model's type is ``deepgrow`` (PointPrompts.tsx:190, MonaiLabelPanel.tsx:327-328); for 2D only slice
      ``k`` of the labelmap is replaced (MonaiLabelPanel.tsx:346-355).
    """
    params = {
        "foreground": foreground,
        "background": background,
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "result_compress": False,
        "restore_label_idx": False,
    }
    return server.post(
        f"/infer/{quote(model, safe='')}",
        params={"image": image, "output": "image"},
        files={"params": (None, json.dumps(params))},
        headers={"accept": "application/json, multipart/form-data"},
    )


def test_info_puts_both_models_in_the_point_prompts_tab(pacs_app):
    """The panel lists a model under Point Prompts only if its type is deepgrow/deepedit/vista3d
    (PointPrompts.tsx:272-281), reads label names and values from a dict (MonaiLabelPanel.tsx:169-176) and
    filters 2D clicks by ``dimension`` (PointPrompts.tsx:153)."""
    info = pacs_app.server.get("/info/").json()
    for model, dimension in (("medsam2_2d", 2), ("medsam2_3d", 3)):
        assert info["models"][model]["type"] == "deepgrow"
        assert info["models"][model]["dimension"] == dimension
        assert info["models"][model]["labels"] == {LABEL["name"]: LABEL["value"]}


@pytest.mark.parametrize("model", ["medsam2_3d", "medsam2_2d"])
def test_panel_point_prompts_on_a_dicomweb_series(pacs_app, model):
    series = pacs_app.ct.series_uid
    r = panel_point_prompt_infer(pacs_app.server, model, series, FOREGROUND, BACKGROUND)
    assert r.status_code == 200, r.text[:2000]
    label = read_label(r.content)
    image = pacs_app.ct.image
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-4)
    assert np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    arr = sitk.GetArrayFromImage(label)  # (k, j, i)
    assert arr.dtype == np.uint8 and set(np.unique(arr).tolist()) <= {0, LABEL["value"]}
    labelled_slices = np.nonzero(arr.any(axis=(1, 2)))[0].tolist()
    assert CLICK_SLICE in labelled_slices
    if model == "medsam2_2d":
        assert labelled_slices == [CLICK_SLICE]
    else:
        assert len(labelled_slices) > 1  # propagated from the clicked (key) slice
    log = pacs_app.server.log.read_text()
    assert f"'model': '{model}', 'image': '{series}', 'foreground': {FOREGROUND}" in log


def test_panel_gets_the_nrrd_it_parses(pacs_app):
    """The panel asks for ``result_extension=.nrrd``, ``result_dtype=uint8``, ``result_compress=false``
    (MonaiLabelClient.js:34-38) and reads the answer as raw uint8 NRRD voxels of the viewport's volume."""
    r = panel_point_prompt_infer(pacs_app.server, "medsam2_3d", pacs_app.ct.series_uid, FOREGROUND, BACKGROUND)
    assert r.status_code == 200, r.text[:2000]
    header, _, data = r.content.partition(b"\n\n")
    assert header.startswith(b"NRRD"), r.content[:16]
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:] if ": " in line)
    assert fields["type"] in ("uint8", "unsigned char", "uchar")
    assert fields["encoding"] == "raw"
    assert [int(v) for v in fields["sizes"].split()] == list(pacs_app.ct.image.GetSize())
    assert len(data) == int(np.prod(pacs_app.ct.image.GetSize()))
