// What an annotator does in the panel, independent of how it is drawn: prompts waiting to be sent, running
// them, writing answers into the labelmap, undo/redo, saving. State lives here (not in the React component,
// which OHIF unmounts when another tab is shown); the panel subscribes to it.

import { AXIS_NAMES, nativePrompts, promptFromVoxels, PROMPT_TOOLS, viewAxis } from './prompts.js';
import { annotationPoints, cornerstoneLibraries, worldToVoxel } from './viewer.js';
import { gridMismatch, readLabel, regionMismatch, writeNrrd } from './nrrd.js';
import { ServerApi } from './server_api.js';
import { Heartbeat } from './heartbeat.js';
import { labelsFromInfo, loadImageLabels } from './labels.js';

const PROMPT_COLOURS = { box: 'rgb(255, 221, 0)', foreground: 'rgb(0, 230, 118)', background: 'rgb(255, 64, 64)' };
const KIND_OF_TOOL = Object.fromEntries(Object.entries(PROMPT_TOOLS).map(([kind, tool]) => [tool, kind]));
const MAX_UNDO = 16;
const REFUSED = new Set([400, 413, 415, 422]); // the server cannot use the prompts as drawn
const SESSION_GONE = new Set([404, 409, 422]); // undo/redo: the server's session no longer has that step
const CLIENT_ID = `ohif-${Math.random().toString(36).slice(2, 10)}`; // one per page: one server session

function newImageState() {
  return {
    pending: [], // drawn, not sent: {uid, kind, polarity, label, drawnAt}
    sent: [], // the drawings of the last answer, shown until the next one
    prompted: new Set(), // "axis:label" of the 3D labels the server's sessions (one per axis) hold
    answerIds: new Map(), // axis -> the server's answer_id of the state the overlay shows (changed_since)
    prompts2d: new Map(), // "label@slice" -> the 2D prompts sent there (the server's 2D starts each slice afresh)
    done: [],
    undone: [],
    lastRun3d: null,
  };
}

export class Annotator {
  constructor(bridge) {
    this.bridge = bridge;
    this.api = new ServerApi(() => this.authHeaders());
    this.heartbeat = new Heartbeat({
      beat: image => this.api.heartbeat(image),
      image: () => this.bridge.active()?.displaySet.SeriesInstanceUID ?? null,
      refused: detail => this.update({ error: `The MedSAM2 server: ${detail}` }),
    });
    this.clientId = CLIENT_ID;
    this.images = new Map();
    this.listeners = new Set();
    this.rerun = false;
    this.state = {
      info: null, labels: [], label: null, dimension: '3d', tool: null, polarity: 'foreground', live: false,
      saved: [], // labels saved for the active series (C4), newest first
      refineFrom: null, // the next 3D request refines this saved label (`refine_from`)
      newObject: new Set(), // labels whose next prompt starts a new object (not a correction)
      apiKey: '', // typed in the panel when OHIF has no user token (C5)
      range: null, // 3D: propagate this many slices either side of the prompted ones (null: the whole axis)
      busy: false, status: 'Connecting…', error: null, lastRun: null, lastRun3d: null,
    };
  }

  /** C5: OHIF's own user token when OHIF has one, else the API key typed in the panel (none: no header). */
  authHeaders() {
    const ohif = this.bridge.authorizationHeader();
    if (ohif?.Authorization) return { Authorization: ohif.Authorization };
    return this.state.apiKey ? { 'X-API-Key': this.state.apiKey } : {};
  }

  /** The API key typed in the panel (C5): sent by the panel, and by OHIF's DICOMweb requests when OHIF has
   * no login of its own. */
  setApiKey(apiKey) {
    this.update({ apiKey });
    this.bridge.useApiKey(apiKey);
  }

  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  update(change) {
    this.state = { ...this.state, ...change };
    for (const listener of this.listeners) listener(this.state);
  }

  /** Per-series state of the active viewport's series (null when it shows none). */
  imageState(view = this.bridge.active()) {
    if (!view) return null;
    const uid = view.displaySet.displaySetInstanceUID;
    if (!this.images.has(uid)) this.images.set(uid, newImageState());
    return this.images.get(uid);
  }

  /** The active viewport changed: show its series' last 3D answer. */
  viewChanged() {
    const series = this.bridge.active()?.displaySet.SeriesInstanceUID ?? null;
    this.update({ lastRun3d: this.imageState()?.lastRun3d ?? null });
    if (series !== this.series && this.state.info) {
      this.series = series;
      this.heartbeat.send();
      loadImageLabels(this);
    }
  }

  async connect() {
    try {
      const info = await this.api.info();
      const labels = labelsFromInfo(info);
      this.update({ info, labels, label: labels[0]?.name ?? null, status: `Connected: ${info.name}`, error: null });
    } catch (e) {
      this.update({ status: 'Not connected', error: `The MedSAM2 server did not answer /info/ (${e.detail ?? e.message}).` });
      return;
    }
    this.heartbeat.start();
    await loadImageLabels(this);
  }

  /** The mode is left: no more heartbeats. */
  close() {
    this.heartbeat.stop();
  }

  setTool(tool) {
    this.bridge.selectTool(tool);
    this.update({ tool });
  }

  labelValue(name) {
    return this.state.labels.find(l => l.name === name)?.value;
  }

  /** The prompt a drawing makes now ({slice, axis, key, value}); throws with what is wrong with it. */
  promptOf(view, entry) {
    const { cst } = cornerstoneLibraries();
    const annotation = cst.annotation.state.getAnnotation(entry.uid);
    if (!annotation) return null; // deleted in the viewer
    const axis = viewAxis(view.grid, annotation.metadata?.viewPlaneNormal);
    if (axis !== 2 && entry.dimension === '2d') {
      throw new Error(`2D answers are on axial views; on this ${AXIS_NAMES[axis]} view choose 3D (±0 slices: this slice alone)`);
    }
    const voxels = annotationPoints(annotation).map(p => worldToVoxel(view.grid, p));
    const prompt = promptFromVoxels(entry.kind, entry.polarity, voxels, view.grid.dimensions, axis);
    const shownOn = axis === 2 ? view.grid.imageIds.indexOf(annotation.metadata?.referencedImageId) : -1;
    if (shownOn >= 0 && shownOn !== prompt.slice) throw new Error('it is not on the slice it was drawn on');
    return { ...entry, ...prompt };
  }

  /** A drawing finished in a viewport: keep it as a prompt (and run it in live mode). */
  onAnnotationCompleted(annotation) {
    const kind = KIND_OF_TOOL[annotation?.metadata?.toolName];
    if (!kind) return;
    const view = this.bridge.active();
    const image = this.imageState(view);
    const fail = message => {
      this.bridge.removeAnnotations([annotation.annotationUID]);
      this.update({ error: message });
    };
    if (!view || !image) return fail('Open a series in the viewport first.');
    if (!this.state.label) return fail('Choose a label first.');
    const { polarity, label, dimension, newObject } = this.state;
    const entry = { uid: annotation.annotationUID, kind, polarity, label, dimension, fresh: newObject.has(label) };
    let prompt;
    try {
      prompt = this.promptOf(view, entry);
    } catch (e) {
      return fail(`That drawing cannot be used: ${e.message}.`);
    }
    const colour = kind === 'box' ? PROMPT_COLOURS.box : PROMPT_COLOURS[entry.polarity];
    this.bridge.styleAnnotation(annotation, colour, view.viewportId);
    image.pending.push({ ...entry, drawnAt: performance.now() });
    const where = `${AXIS_NAMES[prompt.axis]} slice ${prompt.slice}`;
    this.update({ error: null, status: `${image.pending.length} prompt(s) ready on ${where}` });
    if (this.state.live) this.run();
  }

  /** Send the prompts drawn since the last run (as they are now: moved handles count, deleted drawings not). */
  async run() {
    if (this.state.busy) return (this.rerun = true);
    const view = this.bridge.active();
    const image = this.imageState(view);
    if (!view || !image) return this.update({ error: 'Open a series in the viewport first.' });
    const drawn = [];
    for (const entry of image.pending) {
      try {
        const prompt = this.promptOf(view, entry);
        if (prompt) drawn.push(prompt);
      } catch (e) {
        this.bridge.removeAnnotations([entry.uid]);
        this.update({ error: `A drawing was dropped: ${e.message}.` });
      }
    }
    image.pending = [];
    if (!drawn.length) return this.update({ error: this.state.error ?? 'Draw a box, click, scribble or lasso first.' });
    this.update({ busy: true, error: null, status: 'Running…' });
    try {
      for (const batch of batches(drawn, image)) {
        const model = modelOf(batch[0]);
        this.update({ status: `Running ${model}…` });
        if (!(await this.send(view, image, model, batch))) break;
      }
    } finally {
      this.idle();
    }
  }

  /** One request; true when its answer is shown. */
  async send(view, image, model, drawn) {
    const started = performance.now();
    const { params, prompts2d } = requestParams(model, drawn, image, this.clientId);
    Object.assign(params, this.regionParams(view, image, model, drawn));
    const reply = await this.ask(view, image, model, drawn, params);
    if (!reply) return false;
    const applying = performance.now();
    const step = await this.show(view, model, drawn, reply);
    if (!step) return false;
    const written = performance.now();
    await new Promise(resolve => requestAnimationFrame(() => resolve())); // the overlay's frame
    const timing = answerTiming(drawn, reply, { started, applying, written, shown: performance.now() });
    const slices = params.prompts.map(p => p.slice);
    const result = { model, answer: reply.answer, timing, slices, axis: AXIS_NAMES[drawn[0].axis], bytes: reply.bytes };
    result.refinedFrom = params.refine_from ?? null;
    this.record(image, step, { model, drawn, prompts2d, result });
    return true;
  }

  /** The server's answer to one request, or null (refused: the drawings are dropped; failed: kept to resend). */
  async ask(view, image, model, drawn, params) {
    try {
      return await this.api.infer(model, view.displaySet.SeriesInstanceUID, params);
    } catch (e) {
      const retry = retryParams(e, params, model);
      if (retry) {
        image.answerIds.delete(drawn[0].axis);
        return this.ask(view, image, model, drawn, retry);
      }
      if (REFUSED.has(e.status)) {
        this.bridge.removeAnnotations(drawn.map(p => p.uid));
        this.update({ error: `Not used: ${e.detail}`, status: `${model}: prompts refused` });
      } else {
        image.pending = [...drawn, ...image.pending]; // busy or unreachable: Run sends them again
        this.update({ error: `${e.detail ?? e.message} (press Run to try again)`, status: `${model} failed` });
      }
      return null;
    }
  }

  /** Write an answer into the labelmap; its undo step, or null when it cannot be shown (then the server's
   * session steps back too). */
  async show(view, model, drawn, reply) {
    try {
      return await this.applyAnswer(view, model, drawn, reply.answer, reply.label);
    } catch (e) {
      const undo = { ...this.sessionParams(model, drawn[0].axis), undo: true };
      this.api.infer(model, view.displaySet.SeriesInstanceUID, undo, 'json').catch(() => {});
      this.bridge.removeAnnotations(drawn.map(p => p.uid));
      this.update({ error: `The answer was not shown: ${e.message}.`, status: `${model}: not shown` });
      return null;
    }
  }

  /** An answer was shown: it becomes the image's last step (undo goes back to the state before it). */
  record(image, step, { model, drawn, prompts2d, result }) {
    step.before = snapshot(image);
    step.axis = drawn[0].axis;
    if (model === 'medsam2_3d') {
      if (result.refinedFrom) image.prompted = new Set([...image.prompted].filter(k => !k.startsWith(`${step.axis}:`)));
      drawn.forEach(p => image.prompted.add(promptedKey(p)));
      image.lastRun3d = result;
      const newObject = new Set([...this.state.newObject].filter(l => !drawn.some(p => p.label === l)));
      this.update({ newObject, refineFrom: result.refinedFrom ? null : this.state.refineFrom });
    }
    image.answerIds.set(step.axis, result.answer.answer_id);
    if (prompts2d) image.prompts2d = prompts2d;
    step.after = snapshot(image);
    this.bridge.removeAnnotations(image.sent.map(p => p.uid));
    image.sent = drawn;
    image.done = [...image.done, step].slice(-MAX_UNDO);
    image.undone = [];
    const status = `${model}: answered in ${result.timing.request_to_overlay_s.toFixed(1)} s`;
    this.update({ status, lastRun: result, lastRun3d: image.lastRun3d });
  }

  /** What names the server's session of `model` along `axis`: the page's client id (and the axis, 3D). */
  sessionParams(model, axis) {
    return model === 'medsam2_3d' ? { client_id: this.clientId, axis: AXIS_NAMES[axis] } : { client_id: this.clientId };
  }

  /** `axis`, `slice_range` (3D, with a range set) and `changed_since`: the last answer of the session the
   * overlay shows, or "empty" for a new session (its answer's box then replaces the covered labels inside it
   * only: what other sessions, e.g. along another axis, drew elsewhere stays). */
  regionParams(view, image, model, drawn) {
    const axis = drawn[0].axis;
    const params = this.sessionParams(model, axis);
    const range = this.state.range;
    if (model === 'medsam2_3d' && Number.isInteger(range) && range >= 0) {
      const slices = drawn.map(p => p.slice);
      const last = view.grid.dimensions[axis] - 1;
      params.slice_range = [Math.max(0, Math.min(...slices) - range), Math.min(last, Math.max(...slices) + range)];
    }
    if (model === 'medsam2_3d' && this.state.refineFrom) {
      // the session starts over from the saved label, which the overlay does not hold: the whole label
      return { ...params, refine_from: this.state.refineFrom, correction: false };
    }
    params.changed_since = image.answerIds.get(axis) ?? 'empty';
    // 2D edits the slice of the session's label (else the server's 2D answer is that slice alone, and the
    // changed region every other slice of the label)
    if (model === 'medsam2_2d' && image.answerIds.has(axis)) params.refine_from = 'last';
    return params;
  }

  /** Write an answer's labels into the labelmap: 3D replaces the session's labels on every slice, 2D the
   * prompted labels on the prompted slices; other labels stay. Returns the undo step (the changed voxels). */
  async applyAnswer(view, model, drawn, answer, buffer) {
    if (!this.bridge.showing(view.displaySet.displaySetInstanceUID)) {
      throw new Error('the viewport shows another series now');
    }
    const label = await readLabel(buffer);
    const mismatch = label.offset ? regionMismatch(label, view.grid) : gridMismatch(label, view.grid);
    if (mismatch) throw new Error(`the label does not lie on the series: ${mismatch}`);
    const box = answerBox(label, view.grid.dimensions, model === 'medsam2_3d' ? null : drawn.map(p => p.slice));
    const names = new Set(drawn.map(p => p.label));
    if (model === 'medsam2_3d') Object.keys(answer.confidence ?? {}).forEach(n => names.add(n));
    const covered = new Set([...names].map(n => this.labelValue(n)));
    const map = await this.bridge.labelmap(view, this.state.labels);
    const changes = new Map();
    for (const k of box.slices) {
      const voxels = this.bridge.sliceVoxels(map, k);
      const change = changedVoxels(voxels, label.data, box.at(k), covered);
      if (change) {
        changes.set(k, change);
        writeVoxels(voxels, change, false);
      }
    }
    this.bridge.labelmapChanged(map);
    return { model, changes };
  }

  /** Undo (`back`) or redo the last step: the server's session steps first, then the overlay, exactly. */
  async step(back) {
    if (this.state.busy) return;
    const view = this.bridge.active();
    const image = this.imageState(view);
    if (!view || !image) return;
    const from = back ? image.done : image.undone;
    const step = from.at(-1);
    if (!step) return this.update({ error: back ? 'Nothing to undo.' : 'Nothing to redo.' });
    this.update({ busy: true, error: null, status: back ? 'Undoing…' : 'Redoing…' });
    try {
      const sessionGone = step.model === 'local' ? false : await this.stepServer(view, image, step, back);
      if (sessionGone === null) return;
      from.pop();
      (back ? image.undone : image.done).push(step);
      await this.stepOverlay(view, image, step, back, sessionGone);
    } finally {
      this.idle();
    }
  }

  /** The server's session steps back or forward: false when it did, true when it no longer has that step,
   * null when it failed (nothing was changed). */
  async stepServer(view, image, step, back) {
    const params = { ...this.sessionParams(step.model, step.axis), [back ? 'undo' : 'redo']: true };
    try {
      const { answer } = await this.api.infer(step.model, view.displaySet.SeriesInstanceUID, params, 'json');
      image.answerIds.set(step.axis, answer.answer_id);
      return false;
    } catch (e) {
      if (SESSION_GONE.has(e.status)) {
        image.answerIds.delete(step.axis);
        return true;
      }
      this.update({ error: `${e.detail ?? e.message} (nothing was ${back ? 'undone' : 'redone'}; try again)` });
      return null;
    }
  }

  /** The overlay and the image's state go back (or forward) over `step`. */
  async stepOverlay(view, image, step, back, sessionGone) {
    const map = await this.bridge.labelmap(view, this.state.labels);
    for (const [k, change] of step.changes) writeVoxels(this.bridge.sliceVoxels(map, k), change, back);
    this.bridge.labelmapChanged(map);
    const restored = back ? step.before : step.after;
    image.prompted = sessionGone ? new Set() : new Set(restored.prompted);
    image.prompts2d = sessionGone ? new Map() : restored.prompts2d;
    image.lastRun3d = restored.lastRun3d;
    if (step.model === 'local') image.answerIds = new Map(restored.answerIds);
    this.bridge.removeAnnotations(image.sent.map(p => p.uid));
    image.sent = [];
    this.update({
      status: back ? 'Undone' : 'Redone',
      lastRun3d: image.lastRun3d,
      error: sessionGone
        ? "The overlay was restored, but the server's session had lost that step; the next prompt starts a new session."
        : null,
    });
  }

  /** Save the whole labelmap as the series' final label (next to a PACS: a DICOM SEG in the study). */
  async save() {
    if (this.state.busy) return;
    const view = this.bridge.active();
    if (!view) return this.update({ error: 'Open a series in the viewport first.' });
    if (!this.bridge.hasLabelmap(view)) return this.update({ error: 'Nothing to save: the label is empty.' });
    this.update({ busy: true, error: null, status: 'Saving…' });
    try {
      const map = await this.bridge.labelmap(view, this.state.labels);
      const dims = view.grid.dimensions;
      const size = dims[0] * dims[1];
      const volume = new Uint8Array(size * dims[2]);
      for (let k = 0; k < dims[2]; k++) volume.set(this.bridge.sliceVoxels(map, k), k * size);
      if (!volume.some(v => v !== 0)) return this.update({ error: 'Nothing to save: the label is empty.' });
      await this.api.saveLabel(view.displaySet.SeriesInstanceUID, writeNrrd(volume, view.grid), this.state.labels);
      this.update({ status: 'Saved as the final label' });
      this.bridge.notify('success', 'MedSAM2', 'Label saved');
    } catch (e) {
      this.update({ error: `Not saved: ${e.detail ?? e.message}`, status: 'Save failed' });
    } finally {
      this.idle();
    }
  }

  /** The label's next prompt starts a new object (its earlier prompts are dropped at the server), or refines
   * what it has (`on` false). */
  setNewObject(on, label = this.state.label) {
    const newObject = new Set(this.state.newObject);
    if (on) newObject.add(label);
    else newObject.delete(label);
    this.update({ newObject });
  }

  /** Clear the chosen label from the overlay (an undoable step); its next prompt starts a new object. */
  async resetLabel() {
    const view = this.bridge.active();
    const image = this.imageState(view);
    const { label } = this.state;
    if (this.state.busy || !view || !image || !label) return;
    if (!this.bridge.hasLabelmap(view)) return this.update({ error: `Nothing to reset: ${label} is empty.` });
    const map = await this.bridge.labelmap(view, this.state.labels);
    const changes = labelVoxels(view, map, this.bridge, this.labelValue(label));
    this.bridge.labelmapChanged(map);
    const step = { model: 'local', changes, axis: null, before: snapshot(image) };
    image.prompted = new Set([...image.prompted].filter(k => !k.endsWith(`:${label}`)));
    image.answerIds = new Map(); // "empty": the next answer writes its whole box
    step.after = snapshot(image);
    this.bridge.removeAnnotations(image.sent.map(p => p.uid)); // the drawings of the answer just cleared
    image.sent = [];
    image.done = [...image.done, step].slice(-MAX_UNDO);
    image.undone = [];
    this.setNewObject(false, label);
    this.update({ error: null, status: `${label} reset (Undo brings it back)` });
  }

  /** Drop the prompts not sent yet. */
  clearPending() {
    const image = this.imageState();
    if (!image) return;
    this.bridge.removeAnnotations(image.pending.map(p => p.uid));
    image.pending = [];
    this.update({ status: 'Prompts cleared' });
  }

  /** Not busy any more; in live mode, run what was drawn meanwhile. */
  idle() {
    this.update({ busy: false });
    if (this.rerun) {
      this.rerun = false;
      if (this.state.live && this.imageState()?.pending.length) this.run();
    }
  }
}

/** The request again when the server's session no longer holds what the panel knew of it, else null: 409, the
 * state the overlay shows (3D: ask for the whole label; 2D: the slice alone, against "empty", so a 2D answer
 * never carries the whole volume); 404 for `refine_from: "last"`, no answer yet (without it). */
function retryParams(error, params, model) {
  if (error.status === 409 && params.changed_since) {
    const since = model === 'medsam2_2d' ? 'empty' : undefined;
    return { ...params, changed_since: since, refine_from: undefined };
  }
  if (error.status === 404 && params.refine_from === 'last') return { ...params, refine_from: undefined };
  return null;
}

/** The model a prompt was drawn for. */
function modelOf(prompt) {
  return prompt.dimension === '2d' ? 'medsam2_2d' : 'medsam2_3d';
}

/** The requests for a run's prompts, by model and axis: 2D, one a slice (the server answers one slice at a
 * time); 3D, the labels the session holds (a correction: added to their key slices) apart from new ones (which
 * replace nothing). */
function batches(drawn, image) {
  const groups = new Map();
  for (const p of drawn) {
    const within = p.dimension === '2d' ? p.slice : image.prompted.has(promptedKey(p)) && !p.fresh;
    const key = `${p.axis}:${p.dimension}:${within}`;
    groups.set(key, [...(groups.get(key) ?? []), p]);
  }
  return [...groups.values()];
}

/** A request's params ({params, prompts2d}): 3D, the drawn prompts (a correction when the session holds every
 * label); 2D, everything drawn on the prompted slices (the server's 2D starts each slice afresh). */
function requestParams(model, drawn, image, clientId) {
  const params = { client_id: clientId };
  if (model === 'medsam2_3d') {
    params.prompts = nativePrompts(drawn);
    params.correction = drawn.every(p => image.prompted.has(promptedKey(p)) && !p.fresh);
    return { params, prompts2d: null };
  }
  const prompts2d = new Map(image.prompts2d);
  for (const p of drawn) prompts2d.set(sliceKey(p), [...(prompts2d.get(sliceKey(p)) ?? []), p]);
  params.prompts = nativePrompts([...new Set(drawn.map(sliceKey))].flatMap(key => prompts2d.get(key)));
  return { params, prompts2d };
}

/** Where the time of one answer went (seconds), from the last drawing to the overlay's frame. */
function answerTiming(drawn, reply, { started, applying, written, shown }) {
  const seconds = (from, to) => Math.round(to - from) / 1000;
  return {
    prompt_to_overlay_s: seconds(Math.max(...drawn.map(p => p.drawnAt)), shown),
    request_to_overlay_s: seconds(started, shown),
    server_s: reply.answer.latencies?.total ?? null,
    until_answer_s: seconds(started, reply.answeredAt), // request, server, first bytes back
    receive_s: seconds(reply.answeredAt, reply.receivedAt), // the multipart body read and split
    write_s: seconds(applying, written), // NRRD parsed, grid checked, labelmap written
    frame_s: seconds(written, shown),
  };
}

/** The key of a 3D label in the server's session along the prompt's axis. */
function promptedKey(prompt) {
  return `${prompt.axis}:${prompt.label}`;
}

/** Where an answer's label lies: {slices (k) it covers, at(k): where slice k's rows lie in the label's data
 * and on the series' slice}. A changed region covers its box; a whole 2D label (`slices2d`) its prompted
 * slices; a whole 3D label every slice. */
function answerBox(label, dims, slices2d) {
  const [i0, j0, k0] = label.offset ?? [0, 0, 0];
  const [si, sj, sk] = label.sizes;
  const region = Boolean(label.offset);
  const all = [...Array(region ? sk : dims[2]).keys()].map(n => n + k0);
  const slices = !region && slices2d ? [...new Set(slices2d)] : all;
  return { slices, at: k => ({ start: (k - k0) * si * sj, i0, j0, si, sj, width: dims[0] }) };
}

/** Clear every voxel of `value` in the labelmap: the undo step's changes (slice -> {index, before, after}). */
function labelVoxels(view, map, bridge, value) {
  const changes = new Map();
  for (let k = 0; k < view.grid.dimensions[2]; k++) {
    const voxels = bridge.sliceVoxels(map, k);
    const index = [];
    for (let v = 0; v < voxels.length; v++) if (voxels[v] === value) index.push(v);
    if (!index.length) continue;
    const change = { index: Uint32Array.from(index), before: new Uint8Array(index.length).fill(value), after: new Uint8Array(index.length) };
    writeVoxels(voxels, change, false);
    changes.set(k, change);
  }
  return changes;
}

/** What undo and redo restore of an image's state. */
function snapshot(image) {
  const { prompted, prompts2d, lastRun3d, answerIds } = image;
  return { prompted: new Set(prompted), prompts2d, lastRun3d, answerIds: new Map(answerIds) };
}

/** Where a 2D prompt's earlier prompts are kept: its label on its slice. */
function sliceKey(prompt) {
  return `${prompt.label}@${prompt.slice}`;
}

/** The voxels of a labelmap slice an answer changes ({index, before, after}), or null: inside the answer's
 * rows (`at`: the box on the slice and where its voxels start in `answer`), the answer's labels where it has
 * one, the covered labels cleared elsewhere, other labels kept. Two passes over typed arrays: a 512 x 512
 * slice is 262,144 voxels, and a 3D answer has hundreds of slices. */
function changedVoxels(current, answer, at, covered) {
  const clear = new Uint8Array(256);
  for (const value of covered) clear[value] = 1;
  const visit = write => {
    let n = 0;
    for (let jj = 0; jj < at.sj; jj++) {
      const row = (at.j0 + jj) * at.width + at.i0;
      const from = at.start + jj * at.si;
      for (let ii = 0; ii < at.si; ii++) {
        const old = current[row + ii];
        const value = answer[from + ii] || (clear[old] ? 0 : old);
        if (value !== old && write) write(n, row + ii, old, value);
        if (value !== old) n++;
      }
    }
    return n;
  };
  const count = visit(null);
  if (!count) return null;
  const change = { index: new Uint32Array(count), before: new Uint8Array(count), after: new Uint8Array(count) };
  visit((n, v, old, value) => {
    change.index[n] = v;
    change.before[n] = old;
    change.after[n] = value;
  });
  return change;
}

function writeVoxels(voxels, change, back) {
  const values = back ? change.before : change.after;
  for (let n = 0; n < change.index.length; n++) voxels[change.index[n]] = values[n];
}
