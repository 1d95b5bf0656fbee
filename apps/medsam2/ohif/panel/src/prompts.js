// Drawn annotations -> the app's native prompts ({label, slice, box | foreground | ..._scribbles | ..._lasso}),
// in voxel indices of the image as the server stores it (x = i, y = j on an axial slice, slice = k).

/** The prompt kinds the panel draws, with the cornerstone tool that draws each. */
export const PROMPT_TOOLS = {
  box: 'RectangleROI',
  click: 'Probe',
  scribble: 'MedSAM2Scribble',
  lasso: 'MedSAM2Lasso',
};

const round = v => Math.round(v);

/** The slice (k) a drawing lies on; null when its points are not on one axial slice. */
export function sliceOf(voxels) {
  const ks = voxels.map(v => round(v[2]));
  return ks.every(k => k === ks[0]) ? ks[0] : null;
}

/**
 * One drawn prompt as {slice, key, value}: `key` is the native prompt key (box, foreground, background,
 * foreground_scribbles, ...), `value` what goes under it.
 */
export function promptFromVoxels(kind, polarity, voxels, dimensions) {
  const slice = sliceOf(voxels);
  if (slice === null) throw new Error('draw on an axial slice: the drawing spans several slices');
  const outside = v => v[0] < -0.5 || v[1] < -0.5 || v[0] > dimensions[0] - 0.5 || v[1] > dimensions[1] - 0.5;
  if (kind === 'box' ? voxels.every(outside) : voxels.some(outside)) throw new Error('it leaves the image');
  const xy = voxels.map(v => [round(v[0]), round(v[1])]);
  if (kind === 'box') {
    const xs = xy.map(p => p[0]);
    const ys = xy.map(p => p[1]);
    return { slice, key: 'box', value: [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)] };
  }
  const side = polarity === 'background' ? 'background' : 'foreground';
  if (kind === 'click') return { slice, key: side, value: xy.slice(0, 1) };
  const path = xy.filter((p, n) => n === 0 || p[0] !== xy[n - 1][0] || p[1] !== xy[n - 1][1]);
  return { slice, key: kind === 'lasso' ? `${side}_lasso` : `${side}_scribbles`, value: [path] };
}

/** Drawn prompts ({label, slice, key, value}) grouped into the native `prompts` list (one entry per label and
 * slice; a later box on the same slice replaces an earlier one, everything else adds up). Boxes leaving the
 * image are clipped by the server (and it says so). */
export function nativePrompts(drawn) {
  const entries = new Map();
  for (const { label, slice, key, value } of drawn) {
    const id = `${label}\u0000${slice}`;
    const entry = entries.get(id) ?? { label, slice };
    if (key === 'box') entry.box = value;
    else entry[key] = [...(entry[key] ?? []), ...value];
    entries.set(id, entry);
  }
  return [...entries.values()];
}
