// What an annotator does in the panel, independent of how it is drawn: prompts waiting to be sent, running
// them, writing answers into the labelmap, undo/redo, saving. State lives here (not in the React component,
// which OHIF unmounts when another tab is shown); the panel subscribes to it.

import { nativePrompts, promptFromVoxels, PROMPT_TOOLS } from './prompts.js';
import { annotationPoints, cornerstoneLibraries, worldToVoxel } from './viewer.js';
import { gridMismatch, parseNrrd, writeNrrd } from './nrrd.js';
import { fetchInfo, infer, saveLabel } from './server_api.js';

const PALETTE = [
  [230, 57, 70], [42, 157, 143], [233, 196, 106], [69, 123, 157], [244, 162, 97], [131, 56, 236], [6, 214, 160],
];
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
    prompted: new Set(), // 3D labels the server's session holds
    prompts2d: new Map(), // "label@slice" -> the 2D prompts sent there (the server's 2D starts each slice afresh)
    done: [],
    undone: [],
    lastRun3d: null,
  };
}

export class Annotator {
  constructor(bridge) {
    this.bridge = bridge;
    this.clientId = CLIENT_ID;
    this.images = new Map();
    this.listeners = new Set();
    this.rerun = false;
    this.state = {
      info: null, labels: [], label: null, dimension: '3d', tool: null, polarity: 'foreground', live: false,
      busy: false, status: 'Connecting…', error: null, lastRun: null, lastRun3d: null,
    };
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
    this.update({ lastRun3d: this.imageState()?.lastRun3d ?? null });
  }

  async connect() {
    try {
      const info = await fetchInfo();
      const named = info.models?.medsam2_3d?.labels ?? {};
      const labels = Object.entries(named)
        .map(([name, value]) => ({ name, value, color: PALETTE[(value - 1) % PALETTE.length] }))
        .sort((a, b) => a.value - b.value);
      this.update({ info, labels, label: labels[0]?.name ?? null, status: `Connected: ${info.name}`, error: null });
    } catch (e) {
      this.update({ status: 'Not connected', error: `The MedSAM2 server did not answer /info/ (${e.message}).` });
    }
  }

  setTool(tool) {
    this.bridge.selectTool(tool);
    this.update({ tool });
  }

  labelValue(name) {
    return this.state.labels.find(l => l.name === name)?.value;
  }

  /** The prompt a drawing makes now ({slice, key, value}); throws with what is wrong with it. */
  promptOf(view, entry) {
    const { cst } = cornerstoneLibraries();
    const annotation = cst.annotation.state.getAnnotation(entry.uid);
    if (!annotation) return null; // deleted in the viewer
    const shownOn = view.grid.imageIds.indexOf(annotation.metadata?.referencedImageId);
    const voxels = annotationPoints(annotation).map(p => worldToVoxel(view.grid, p));
    const prompt = promptFromVoxels(entry.kind, entry.polarity, voxels, view.grid.dimensions);
    if (shownOn >= 0 && shownOn !== prompt.slice) throw new Error('it is not on the slice it was drawn on');
    if (prompt.slice < 0 || prompt.slice >= view.grid.dimensions[2]) throw new Error('it is outside the series');
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
    const entry = { uid: annotation.annotationUID, kind, polarity: this.state.polarity, label: this.state.label };
    let prompt;
    try {
      prompt = this.promptOf(view, entry);
    } catch (e) {
      return fail(`That drawing cannot be used: ${e.message}.`);
    }
    const colour = kind === 'box' ? PROMPT_COLOURS.box : PROMPT_COLOURS[entry.polarity];
    this.bridge.styleAnnotation(annotation, colour, view.viewportId);
    image.pending.push({ ...entry, drawnAt: performance.now() });
    this.update({ error: null, status: `${image.pending.length} prompt(s) ready on slice ${prompt.slice}` });
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
    const model = this.state.dimension === '3d' ? 'medsam2_3d' : 'medsam2_2d';
    this.update({ busy: true, error: null, status: `Running ${model}…` });
    try {
      for (const batch of batches(model, drawn, image)) {
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
    const reply = await this.ask(view, image, model, drawn, params);
    if (!reply) return false;
    const applying = performance.now();
    const step = await this.show(view, model, drawn, reply);
    if (!step) return false;
    const written = performance.now();
    await new Promise(resolve => requestAnimationFrame(() => resolve())); // the overlay's frame
    const timing = answerTiming(drawn, reply, { started, applying, written, shown: performance.now() });
    const result = { model, answer: reply.answer, timing, slices: params.prompts.map(p => p.slice) };
    this.record(image, step, { model, drawn, prompts2d, result });
    return true;
  }

  /** The server's answer to one request, or null (refused: the drawings are dropped; failed: kept to resend). */
  async ask(view, image, model, drawn, params) {
    try {
      return await infer(model, view.displaySet.SeriesInstanceUID, params);
    } catch (e) {
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
      infer(model, view.displaySet.SeriesInstanceUID, { undo: true, client_id: this.clientId }, 'json').catch(() => {});
      this.bridge.removeAnnotations(drawn.map(p => p.uid));
      this.update({ error: `The answer was not shown: ${e.message}.`, status: `${model}: not shown` });
      return null;
    }
  }

  /** An answer was shown: it becomes the image's last step (undo goes back to the state before it). */
  record(image, step, { model, drawn, prompts2d, result }) {
    step.before = snapshot(image);
    if (model === 'medsam2_3d') {
      drawn.forEach(p => image.prompted.add(p.label));
      image.lastRun3d = result;
    }
    if (prompts2d) image.prompts2d = prompts2d;
    step.after = snapshot(image);
    this.bridge.removeAnnotations(image.sent.map(p => p.uid));
    image.sent = drawn;
    image.done = [...image.done, step].slice(-MAX_UNDO);
    image.undone = [];
    const status = `${model}: answered in ${result.timing.request_to_overlay_s.toFixed(1)} s`;
    this.update({ status, lastRun: result, lastRun3d: image.lastRun3d });
  }

  /** Write an answer's labels into the labelmap: 3D replaces the session's labels on every slice, 2D the
   * prompted labels on the prompted slices; other labels stay. Returns the undo step (the changed voxels). */
  async applyAnswer(view, model, drawn, answer, buffer) {
    if (!this.bridge.showing(view.displaySet.displaySetInstanceUID)) {
      throw new Error('the viewport shows another series now');
    }
    const label = parseNrrd(buffer);
    const mismatch = gridMismatch(label, view.grid);
    if (mismatch) throw new Error(`the label does not lie on the series: ${mismatch}`);
    const dims = view.grid.dimensions;
    const names = new Set(drawn.map(p => p.label));
    if (model === 'medsam2_3d') Object.keys(answer.confidence ?? {}).forEach(n => names.add(n));
    const covered = new Set([...names].map(n => this.labelValue(n)));
    const slices = model === 'medsam2_3d' ? [...Array(dims[2]).keys()] : [...new Set(drawn.map(p => p.slice))];
    const map = await this.bridge.labelmap(view, this.state.labels);
    const size = dims[0] * dims[1];
    const changes = new Map();
    for (const k of slices) {
      const voxels = this.bridge.sliceVoxels(map, k);
      const change = changedVoxels(voxels, label.data.subarray(k * size, (k + 1) * size), covered);
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
      const sessionGone = await this.stepServer(view, step.model, back);
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
  async stepServer(view, model, back) {
    const params = { [back ? 'undo' : 'redo']: true, client_id: this.clientId };
    try {
      await infer(model, view.displaySet.SeriesInstanceUID, params, 'json');
      return false;
    } catch (e) {
      if (SESSION_GONE.has(e.status)) return true;
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
      await saveLabel(view.displaySet.SeriesInstanceUID, writeNrrd(volume, view.grid), this.state.labels);
      this.update({ status: 'Saved as the final label' });
      this.bridge.notify('success', 'MedSAM2', 'Label saved');
    } catch (e) {
      this.update({ error: `Not saved: ${e.detail ?? e.message}`, status: 'Save failed' });
    } finally {
      this.idle();
    }
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

/** The requests for a run's prompts: 2D, one a slice (the server answers one slice at a time); 3D, the labels
 * the session holds (a correction: added to their key slices) apart from new ones (which replace nothing). */
function batches(model, drawn, image) {
  const groups = new Map();
  for (const p of drawn) {
    const key = model === 'medsam2_2d' ? p.slice : image.prompted.has(p.label);
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
    params.correction = drawn.every(p => image.prompted.has(p.label));
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

/** What undo and redo restore of an image's state. */
function snapshot(image) {
  return { prompted: new Set(image.prompted), prompts2d: image.prompts2d, lastRun3d: image.lastRun3d };
}

/** Where a 2D prompt's earlier prompts are kept: its label on its slice. */
function sliceKey(prompt) {
  return `${prompt.label}@${prompt.slice}`;
}

/** The voxels of a labelmap slice an answer changes ({index, before, after}), or null: the answer's labels
 * where it has one, the covered labels cleared elsewhere, other labels kept. Two passes over typed arrays: a
 * 512 x 512 slice is 262,144 voxels, and a 3D answer has hundreds of slices. */
function changedVoxels(current, answer, covered) {
  const clear = new Uint8Array(256);
  for (const value of covered) clear[value] = 1;
  let count = 0;
  for (let v = 0; v < current.length; v++) {
    const old = current[v];
    if ((answer[v] || (clear[old] ? 0 : old)) !== old) count++;
  }
  if (!count) return null;
  const change = { index: new Uint32Array(count), before: new Uint8Array(count), after: new Uint8Array(count) };
  for (let v = 0, n = 0; n < count; v++) {
    const old = current[v];
    const value = answer[v] || (clear[old] ? 0 : old);
    if (value !== old) {
      change.index[n] = v;
      change.before[n] = old;
      change.after[n++] = value;
    }
  }
  return change;
}

function writeVoxels(voxels, change, back) {
  const values = back ? change.before : change.after;
  for (let n = 0; n < change.index.length; n++) voxels[change.index[n]] = values[n];
}
