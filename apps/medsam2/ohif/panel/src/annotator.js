// What an annotator does in the panel, independent of how it is drawn: prompts waiting to be sent, running
// them, writing answers into the labelmap, undo/redo, saving. State lives here (not in the React component,
// which OHIF unmounts when another tab is shown); the panel subscribes to it.

import { nativePrompts, promptFromVoxels, PROMPT_TOOLS } from './prompts.js';
import { annotationPoints, worldToVoxel } from './viewer.js';
import { parseNrrd, writeNrrd } from './nrrd.js';
import { fetchInfo, infer, saveLabel } from './server_api.js';

const PALETTE = [
  [230, 57, 70], [42, 157, 143], [233, 196, 106], [69, 123, 157], [244, 162, 97], [131, 56, 236], [6, 214, 160],
];
const PROMPT_COLOURS = { box: 'rgb(255, 221, 0)', foreground: 'rgb(0, 230, 118)', background: 'rgb(255, 64, 64)' };
const KIND_OF_TOOL = Object.fromEntries(Object.entries(PROMPT_TOOLS).map(([kind, tool]) => [tool, kind]));
const MAX_UNDO = 16;

function newImageState() {
  return { pending: [], sent: [], prompted: new Set(), done: [], undone: [] };
}

export class Annotator {
  constructor(bridge) {
    this.bridge = bridge;
    this.clientId = `ohif-${Math.random().toString(36).slice(2, 10)}`;
    this.images = new Map();
    this.listeners = new Set();
    this.state = {
      info: null, labels: [], label: null, dimension: '3d', tool: null, polarity: 'foreground', live: false,
      busy: false, status: 'Connecting…', error: null, image: null,
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
  imageState() {
    const view = this.bridge.active();
    if (!view) return null;
    const uid = view.displaySet.displaySetInstanceUID;
    if (!this.images.has(uid)) this.images.set(uid, newImageState());
    return this.images.get(uid);
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

  /** A drawing finished in a viewport: keep it as a prompt (and run it in live mode). */
  onAnnotationCompleted(annotation) {
    const kind = KIND_OF_TOOL[annotation?.metadata?.toolName];
    if (!kind) return;
    const view = this.bridge.active();
    const image = this.imageState();
    const fail = message => {
      this.bridge.removeAnnotations([annotation.annotationUID]);
      this.update({ error: message });
    };
    if (!view || !image) return fail('Open a series in the viewport first.');
    if (!this.state.label) return fail('Choose a label first.');
    let prompt;
    try {
      const voxels = annotationPoints(annotation).map(p => worldToVoxel(view.grid, p));
      prompt = promptFromVoxels(kind, this.state.polarity, voxels);
    } catch (e) {
      return fail(`That drawing cannot be used: ${e.message}.`);
    }
    if (prompt.slice < 0 || prompt.slice >= view.grid.dimensions[2]) return fail('The drawing is outside the series.');
    const colour = kind === 'box' ? PROMPT_COLOURS.box : PROMPT_COLOURS[this.state.polarity];
    this.bridge.styleAnnotation(annotation, colour, view.viewportId);
    image.pending.push({ uid: annotation.annotationUID, label: this.state.label, drawnAt: performance.now(), ...prompt });
    this.update({ error: null, status: `${image.pending.length} prompt(s) ready on slice ${prompt.slice}` });
    if (this.state.live) this.run();
  }

  /** Send the prompts drawn since the last run; write the answer into the labelmap. */
  async run() {
    const view = this.bridge.active();
    const image = this.imageState();
    if (!view || !image) return this.update({ error: 'Open a series in the viewport first.' });
    if (this.state.busy) return (this.rerun = true);
    if (!image.pending.length) return this.update({ error: 'Draw a box, click, scribble or lasso first.' });
    const drawn = image.pending;
    const model = this.state.dimension === '3d' ? 'medsam2_3d' : 'medsam2_2d';
    const keys = drawn.map(p => (model === 'medsam2_3d' ? p.label : `${p.label}@${p.slice}`));
    const params = {
      prompts: nativePrompts(drawn),
      client_id: this.clientId,
      correction: keys.every(key => image.prompted.has(`${model}:${key}`)),
    };
    image.pending = [];
    this.update({ busy: true, error: null, status: `Running ${model}…` });
    const started = performance.now();
    try {
      const { answer, label } = await infer(model, view.displaySet.SeriesInstanceUID, params);
      const step = await this.applyAnswer(view, model, drawn, answer, label);
      await new Promise(resolve => requestAnimationFrame(() => resolve())); // the overlay's frame
      const shown = performance.now();
      const seconds = (shown - started) / 1000;
      const timing = {
        prompt_to_overlay_s: (shown - Math.max(...drawn.map(p => p.drawnAt))) / 1000,
        request_to_overlay_s: seconds,
        server_s: answer.latencies?.total ?? null,
      };
      const result = { model, answer, seconds, timing, slices: params.prompts.map(p => p.slice) };
      step.before3d = this.state.lastRun3d;
      step.after3d = model === 'medsam2_3d' ? result : step.before3d;
      keys.forEach(key => image.prompted.add(`${model}:${key}`));
      this.bridge.removeAnnotations(image.sent.map(p => p.uid));
      image.sent = drawn;
      image.done = [...image.done, step].slice(-MAX_UNDO);
      image.undone = [];
      this.update({ status: `${model}: answered in ${seconds.toFixed(1)} s`, lastRun: result, lastRun3d: step.after3d });
    } catch (e) {
      if (e.status >= 400 && e.status < 500) {
        // the server cannot use these prompts as drawn: drop them (their drawings too), say why
        this.bridge.removeAnnotations(drawn.map(p => p.uid));
        this.update({ error: `Not used: ${e.detail}`, status: `${model}: prompts refused` });
      } else {
        image.pending = [...drawn, ...image.pending]; // the server was busy or unreachable: Run retries them
        this.update({ error: `${e.detail ?? e.message} (press Run to try again)`, status: `${model} failed` });
      }
    } finally {
      this.update({ busy: false });
      if (this.rerun) {
        this.rerun = false;
        if (this.state.live && this.imageState()?.pending.length) this.run();
      }
    }
  }

  /** Write an answer's labels into the labelmap: 3D replaces the session's labels on every slice, 2D the
   * prompted labels on the prompted slices; other labels stay. Returns the undo step. */
  async applyAnswer(view, model, drawn, answer, buffer) {
    const { sizes, data } = parseNrrd(buffer);
    const dims = view.grid.dimensions;
    if (sizes.join(' ') !== dims.join(' ')) {
      throw new Error(`the label (${sizes.join('×')}) does not lie on the viewer's series (${dims.join('×')})`);
    }
    const names = new Set(drawn.map(p => p.label));
    if (model === 'medsam2_3d') Object.keys(answer.confidence ?? {}).forEach(n => names.add(n));
    const covered = new Set([...names].map(n => this.labelValue(n)));
    const slices = model === 'medsam2_3d' ? [...Array(dims[2]).keys()] : [...new Set(drawn.map(p => p.slice))];
    const map = await this.bridge.labelmap(view, this.state.labels);
    const size = dims[0] * dims[1];
    const changes = new Map();
    for (const k of slices) {
      const current = this.bridge.sliceVoxels(map, k);
      const next = merged(current, data.subarray(k * size, (k + 1) * size), covered);
      if (next) {
        changes.set(k, { before: current.slice(), after: next });
        current.set(next);
      }
    }
    this.bridge.labelmapChanged(map);
    return { model, changes };
  }

  /** Undo (`back`) or redo the last step: locally exact, and the server's session steps with it. */
  async step(back) {
    const view = this.bridge.active();
    const image = this.imageState();
    if (!view || !image || this.state.busy) return;
    const from = back ? image.done : image.undone;
    const to = back ? image.undone : image.done;
    const step = from.pop();
    if (!step) return this.update({ error: back ? 'Nothing to undo.' : 'Nothing to redo.' });
    const map = await this.bridge.labelmap(view, this.state.labels);
    for (const [k, change] of step.changes) this.bridge.sliceVoxels(map, k).set(back ? change.before : change.after);
    this.bridge.labelmapChanged(map);
    to.push(step);
    this.update({ lastRun3d: back ? step.before3d : step.after3d });
    this.bridge.removeAnnotations(image.sent.map(p => p.uid));
    image.sent = [];
    this.update({ busy: true, error: null, status: back ? 'Undone' : 'Redone' });
    try {
      await infer(step.model, view.displaySet.SeriesInstanceUID, { [back ? 'undo' : 'redo']: true, client_id: this.clientId });
    } catch (e) {
      image.prompted.clear(); // the server's session no longer matches: the next prompt starts it again
      this.update({ error: `The overlay was restored, but the server's session could not follow (${e.detail ?? e.message}); the next prompt starts a new session.` });
    } finally {
      this.update({ busy: false });
    }
  }

  /** Save the whole labelmap as the series' final label (next to a PACS: a DICOM SEG in the study). */
  async save() {
    const view = this.bridge.active();
    if (!view) return this.update({ error: 'Open a series in the viewport first.' });
    const map = await this.bridge.labelmap(view, this.state.labels);
    const dims = view.grid.dimensions;
    const size = dims[0] * dims[1];
    const volume = new Uint8Array(size * dims[2]);
    for (let k = 0; k < dims[2]; k++) volume.set(this.bridge.sliceVoxels(map, k), k * size);
    this.update({ busy: true, error: null, status: 'Saving…' });
    try {
      await saveLabel(view.displaySet.SeriesInstanceUID, writeNrrd(volume, view.grid), this.state.labels);
      this.update({ status: 'Saved as the final label' });
      this.bridge.notify('success', 'MedSAM2', 'Label saved');
    } catch (e) {
      this.update({ error: `Not saved: ${e.detail ?? e.message}`, status: 'Save failed' });
    } finally {
      this.update({ busy: false });
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
}

/** The labelmap slice after an answer: the answer's labels where it has one, the covered labels cleared
 * elsewhere, other labels kept; null when nothing changes. */
function merged(current, answer, covered) {
  let changed = false;
  const next = new Uint8Array(current.length);
  for (let v = 0; v < current.length; v++) {
    const old = current[v];
    const value = answer[v] || (covered.has(old) ? 0 : old);
    next[v] = value;
    if (value !== old) changed = true;
  }
  return changed ? next : null;
}
