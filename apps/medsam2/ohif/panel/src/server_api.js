// The MedSAM2 app's REST API as the panel uses it. The panel is served by the app itself (/ohif/), so every
// URL is relative to the page's origin and the browser's own login (cookies, a reverse proxy) applies.

/** What the server said went wrong, as a message an annotator can act on. */
export class ServerError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

async function failure(response) {
  let detail = response.statusText || 'no answer';
  try {
    const body = await response.json();
    detail = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail ?? body);
  } catch {
    // not JSON: keep the status text
  }
  return new ServerError(response.status, detail);
}

/** GET /info/: the app's models, labels and state. */
export async function fetchInfo() {
  const response = await fetch('/info/', { headers: { accept: 'application/json' } });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/**
 * POST /infer/<model>?image=<id>&output=<output> with `params` (JSON); the answer's JSON and, with `output`
 * `all`, its label file (raw uint8 NRRD, see nrrd.js).
 */
export async function infer(model, image, params, output = 'all') {
  const form = new FormData();
  form.append(
    'params',
    JSON.stringify({ ...params, result_extension: '.nrrd', result_dtype: 'uint8', result_compress: false })
  );
  const query = new URLSearchParams({ image, output });
  let response;
  try {
    response = await fetch(`/infer/${encodeURIComponent(model)}?${query}`, { method: 'POST', body: form });
  } catch (e) {
    throw new ServerError(0, `the MedSAM2 server cannot be reached (${e.message})`);
  }
  if (!response.ok) throw await failure(response);
  if (output === 'json') return { answer: await response.json(), label: null };
  const answered = performance.now();
  const parts = await response.formData();
  const label = parts.get('image');
  return {
    answer: JSON.parse(parts.get('params') || '{}'),
    label: label ? await label.arrayBuffer() : null,
    answeredAt: answered,
    receivedAt: performance.now(),
  };
}

/** PUT /datastore/label: save `nrrd` as the image's final label (next to a PACS: a DICOM SEG in its study). */
export async function saveLabel(image, nrrd, labels) {
  const form = new FormData();
  const labelInfo = labels.map(({ name, value, color }) => ({ name, idx: value, color }));
  form.append('params', JSON.stringify({ label_info: labelInfo }));
  form.append('label', new Blob([nrrd], { type: 'application/octet-stream' }), 'label.nrrd');
  const query = new URLSearchParams({ image, tag: 'final' });
  const response = await fetch(`/datastore/label?${query}`, { method: 'PUT', body: form });
  if (!response.ok) throw await failure(response);
  return response.json();
}
