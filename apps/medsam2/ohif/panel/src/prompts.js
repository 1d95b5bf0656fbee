// Drawn annotations -> the app's native prompts ({label, slice, axis, box | foreground | ..._scribbles |
// ..._lasso}), in voxel indices of the image as the server stores it: on an axial view (axis 2) x = i, y = j
// and slice = k; on a coronal view (axis 1) x = i, y = k, slice = j; on a sagittal view (axis 0) x = j, y = k,
// slice = i (the app's lib/engine/prompts.py, ijk_to_slice).

/** The prompt kinds the panel draws, with the cornerstone tool that draws each. */
export const PROMPT_TOOLS = {
  box: 'RectangleROI',
  click: 'Probe',
  scribble: 'MedSAM2Scribble',
  lasso: 'MedSAM2Lasso',
};

/** The server's names of the IJK axes a view cuts across (the `axis` request field). */
export const AXIS_NAMES = ['sagittal', 'coronal', 'axial'];
/** The IJK axes of a slice's x and y, for slices cut across each IJK axis. */
const IN_PLANE = [[1, 2], [0, 2], [0, 1]];

const round = v => Math.round(v);

/** The IJK axis a view with normal `normal` (world, LPS) cuts across, on `grid`; 2 (axial) without a normal;
 * throws for an oblique view. */
export function viewAxis(grid, normal) {
  if (!normal) return 2;
  for (let axis = 0; axis < 3; axis++) {
    const dir = grid.direction.slice(3 * axis, 3 * axis + 3);
    if (Math.abs(dir[0] * normal[0] + dir[1] * normal[1] + dir[2] * normal[2]) > 0.99) return axis;
  }
  throw new Error('the view is oblique: draw on an axial, coronal or sagittal view of the series');
}

/** The slice (along `axis`) a drawing lies on; null when its points are not on one slice. */
export function sliceOf(voxels, axis = 2) {
  const ks = voxels.map(v => round(v[axis]));
  return ks.every(k => k === ks[0]) ? ks[0] : null;
}

function checkInside(kind, voxels, dimensions, axis) {
  const [x, y] = IN_PLANE[axis];
  const outside = v => v[x] < -0.5 || v[y] < -0.5 || v[x] > dimensions[x] - 0.5 || v[y] > dimensions[y] - 0.5;
  if (kind === 'box' ? voxels.every(outside) : voxels.some(outside)) throw new Error('it leaves the image');
  const slice = sliceOf(voxels, axis);
  if (slice < 0 || slice >= dimensions[axis]) {
    throw new Error(`it is outside the series (slice ${slice}; the ${AXIS_NAMES[axis]} axis has 0..${dimensions[axis] - 1})`);
  }
}

/**
 * One drawn prompt as {slice, axis, key, value}: `key` is the native prompt key (box, foreground, background,
 * foreground_scribbles, ...), `value` what goes under it, in the slice's (x, y).
 */
export function promptFromVoxels(kind, polarity, voxels, dimensions, axis = 2) {
  const slice = sliceOf(voxels, axis);
  if (slice === null) throw new Error('the drawing spans several slices: draw on one slice');
  checkInside(kind, voxels, dimensions, axis);
  const [x, y] = IN_PLANE[axis];
  const xy = voxels.map(v => [round(v[x]), round(v[y])]);
  if (kind === 'box') {
    const xs = xy.map(p => p[0]);
    const ys = xy.map(p => p[1]);
    return { slice, axis, key: 'box', value: [Math.min(...xs), Math.min(...ys), Math.max(...xs), Math.max(...ys)] };
  }
  const side = polarity === 'background' ? 'background' : 'foreground';
  if (kind === 'click') return { slice, axis, key: side, value: xy.slice(0, 1) };
  const path = xy.filter((p, n) => n === 0 || p[0] !== xy[n - 1][0] || p[1] !== xy[n - 1][1]);
  return { slice, axis, key: kind === 'lasso' ? `${side}_lasso` : `${side}_scribbles`, value: [path] };
}

/** Drawn prompts ({label, slice, key, value}, one axis) grouped into the native `prompts` list (one entry per
 * label and slice; a later box on the same slice replaces an earlier one, everything else adds up). Boxes
 * leaving the image are clipped by the server (and it says so). */
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
