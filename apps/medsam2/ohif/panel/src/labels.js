// Labels per image (C4, the app's /medsam2/labels routes): the names the server keeps for the open series, new
// names typed in the panel, the labels saved for it (to refine through `refine_from`), and resetting a label.

const PALETTE = [
  [230, 57, 70], [42, 157, 143], [233, 196, 106], [69, 123, 157], [244, 162, 97], [131, 56, 236], [6, 214, 160],
];
const NAME_RULE = /^[A-Za-z0-9 _\-.()]+$/; // what a DICOM SEG segment label and the PACS accept (C4)
const MAX_NAME = 64;

/** A label of the panel: {name, value, color}. */
export function labelEntry(name, value) {
  return { name, value, color: PALETTE[(value - 1) % PALETTE.length] };
}

/** The labels the app started with (/info/'s medsam2_3d labels), by value. */
export function labelsFromInfo(info) {
  const named = info.models?.medsam2_3d?.labels ?? {};
  return Object.entries(named)
    .map(([name, value]) => labelEntry(name, value))
    .sort((a, b) => a.value - b.value);
}

/** `labels` with the server's `names` for the image added (new names after the highest value, in order). */
export function mergeNames(labels, names) {
  const merged = [...labels];
  let next = Math.max(0, ...labels.map(l => l.value)) + 1;
  for (const name of names ?? []) {
    if (!merged.some(l => l.name === name)) merged.push(labelEntry(name, next++));
  }
  return merged;
}

/** Why `name` cannot be a label name (the server's rule, checked before asking it), or null. */
export function nameProblem(name, labels) {
  if (!name) return 'Type a name for the new label.';
  if (name.length > MAX_NAME) return `A label name has at most ${MAX_NAME} characters (this one has ${name.length}).`;
  if (!NAME_RULE.test(name)) {
    return `"${name}" cannot be a label name: use letters, digits, space and _ - . ( ) (a DICOM SEG refuses others).`;
  }
  return labels.some(l => l.name === name) ? `There is a label "${name}" already.` : null;
}

/** The label names and saved labels the server keeps for the active series (C4); quiet when the app has no
 * such route (an older server): the labels stay those of /info/. */
export async function loadImageLabels(annotator) {
  const view = annotator.bridge.active();
  if (!view) return;
  try {
    const book = await annotator.api.labels(view.displaySet.SeriesInstanceUID);
    annotator.update({ labels: mergeNames(annotator.state.labels, book.names), saved: book.saved ?? [] });
  } catch (e) {
    if (e.status !== 404 && e.status !== 405) annotator.update({ error: `Saved labels not listed: ${e.detail}` });
  }
}

/** Add a label name for the active series (kept by the server: other users and the Slicer plugin see it). */
export async function addLabelName(annotator, typed) {
  const name = (typed ?? '').trim();
  const problem = nameProblem(name, annotator.state.labels);
  if (problem) return annotator.update({ error: problem });
  const view = annotator.bridge.active();
  if (!view) return annotator.update({ error: 'Open a series in the viewport first.' });
  try {
    const book = await annotator.api.addName(view.displaySet.SeriesInstanceUID, name);
    const labels = mergeNames(annotator.state.labels, book.names);
    annotator.update({ labels, label: name, saved: book.saved ?? annotator.state.saved, error: null, status: `Label "${name}" added` });
  } catch (e) {
    annotator.update({ error: `Label "${name}" not added: ${e.detail}` });
  }
}

/** Start from a saved label: the next 3D prompt refines it (`refine_from`); saving writes a new version. */
export function openSaved(annotator, entry) {
  if (!entry?.refine_from) return annotator.update({ error: 'Choose a saved label first.' });
  const when = entry.saved_at ? `, ${entry.saved_at}` : '';
  annotator.update({
    refineFrom: entry.refine_from,
    dimension: '3d',
    error: null,
    status: `Next prompt refines the saved label ${entry.tag ?? ''} v${entry.version ?? '?'} (${entry.source ?? 'local'}${when})`,
  });
}
