// The MedSAM2 app's REST API as the panel uses it. The panel is served by the app itself (/ohif/), so every
// URL is relative to the page's origin; every request carries the panel's credentials (C5: OHIF's own
// `Authorization: Bearer` token when OHIF has one, else the API key typed in the panel as `X-API-Key`).

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
  if (response.status === 429 && response.headers.get('Retry-After')) {
    detail = `${detail} (try again in ${response.headers.get('Retry-After')} s)`;
  }
  return new ServerError(response.status, detail);
}

/** The app's API with the credentials `headers()` gives ({} for none). */
export class ServerApi {
  constructor(headers = () => ({})) {
    this.headers = headers;
  }

  /** fetch `url` with the credentials; a ServerError when it cannot be reached or answers an error. */
  async request(url, init = {}) {
    let response;
    try {
      response = await fetch(url, { ...init, headers: { ...this.headers(), ...(init.headers ?? {}) } });
    } catch (e) {
      throw new ServerError(0, `the MedSAM2 server cannot be reached (${e.message})`);
    }
    if (!response.ok) throw await failure(response);
    return response;
  }

  async json(url, init = {}) {
    const response = await this.request(url, { ...init, headers: { accept: 'application/json', ...(init.headers ?? {}) } });
    return response.status === 204 ? null : response.json();
  }

  /** GET /info/: the app's models, labels and state. */
  info() {
    return this.json('/info/');
  }

  /**
   * POST /infer/<model>?image=<id>&output=<output> with `params` (JSON); the answer's JSON and, with `output`
   * `all`, its label file (raw uint8 NRRD, or with `changed_since` the changed region as gzip NRRD: nrrd.js).
   */
  async infer(model, image, params, output = 'all') {
    const form = new FormData();
    const label = { result_extension: '.nrrd', result_dtype: 'uint8', result_compress: false };
    form.append('params', JSON.stringify({ ...params, ...label }));
    const query = new URLSearchParams({ image, output });
    const response = await this.request(`/infer/${encodeURIComponent(model)}?${query}`, { method: 'POST', body: form });
    if (output === 'json') return { answer: await response.json(), label: null };
    const answeredAt = performance.now();
    const body = await response.arrayBuffer();
    const parts = await new Response(body, { headers: response.headers }).formData();
    const file = parts.get('image');
    return {
      answer: JSON.parse(parts.get('params') || '{}'),
      label: file ? await file.arrayBuffer() : null,
      bytes: body.byteLength, // the answer's body as it came (the label file and the JSON)
      answeredAt,
      receivedAt: performance.now(),
    };
  }

  /** PUT /datastore/label: save `nrrd` as the image's final label (next to a PACS: a DICOM SEG in its study). */
  async saveLabel(image, nrrd, labels) {
    const form = new FormData();
    const labelInfo = labels.map(({ name, value, color }) => ({ name, idx: value, color }));
    form.append('params', JSON.stringify({ label_info: labelInfo }));
    form.append('label', new Blob([nrrd], { type: 'application/octet-stream' }), 'label.nrrd');
    const query = new URLSearchParams({ image, tag: 'final' });
    return this.json(`/datastore/label?${query}`, { method: 'PUT', body: form });
  }

  /** GET /medsam2/labels/{image} (C4): {image, names, saved: [{tag, version, source, refine_from, ...}]}. */
  labels(image) {
    return this.json(`/medsam2/labels/${encodeURIComponent(image)}`);
  }

  /** POST /medsam2/labels/{image}/names (C4): a new label name kept by the server for the image. */
  addName(image, name) {
    const init = { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name }) };
    return this.json(`/medsam2/labels/${encodeURIComponent(image)}/names`, init);
  }

  /** POST /medsam2/heartbeat (C6): the study `image` is still open here. */
  heartbeat(image) {
    const init = { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ image }) };
    return this.request('/medsam2/heartbeat', init);
  }
}
