// NRRD label volumes: the server answers a changed region as a gzip uint8 NRRD box (`changed_since`, see the
// app's docs/api.md#changed-region-answers) or the whole label as raw uint8 NRRD (result_extension .nrrd,
// result_dtype uint8, result_compress false), and takes a raw one back when a label is saved.

const decoder = new TextDecoder();

const numbers = text => (text.match(/-?[\d.]+(?:e[-+]?\d+)?/gi) ?? []).map(Number);

/** The header of an NRRD file: {fields (`key: value` and `key:=value` lines), dataStart (byte offset)}. */
export function nrrdHeader(bytes) {
  let end = -1;
  for (let n = 0; n + 1 < bytes.length; n++) {
    if (bytes[n] === 10 && bytes[n + 1] === 10) {
      end = n;
      break;
    }
  }
  if (end < 0 || decoder.decode(bytes.subarray(0, 4)) !== 'NRRD') throw new Error('the answer is not an NRRD label');
  const fields = {};
  for (const line of decoder.decode(bytes.subarray(0, end)).split('\n').slice(1)) {
    const match = line.startsWith('#') ? null : /^([^:]+):=?\s?(.*)$/.exec(line);
    if (match) fields[match[1].trim()] = match[2].trim();
  }
  return { fields, dataStart: end + 2 };
}

function checkUint8(fields) {
  if (!['uint8', 'uchar', 'unsigned char', 'uint8_t'].includes(fields.type)) {
    throw new Error(`NRRD type ${fields.type} (uint8 expected)`);
  }
}

/** Parse a raw (uncompressed) uint8 NRRD: {sizes: [i, j, k], data: Uint8Array (i fastest), origin, axes}
 * (`axes`: the i, j and k steps in mm, LPS, when the header gives them). */
export function parseNrrd(buffer) {
  const bytes = new Uint8Array(buffer);
  const { fields, dataStart } = nrrdHeader(bytes);
  if (fields.encoding !== 'raw') throw new Error(`NRRD encoding ${fields.encoding} (raw expected)`);
  checkUint8(fields);
  const sizes = fields.sizes.split(/\s+/).map(Number);
  const count = sizes.reduce((a, b) => a * b, 1);
  const data = bytes.subarray(dataStart, dataStart + count); // a view: answers are tens of MB
  if (data.length !== count) throw new Error(`NRRD data has ${data.length} voxels, ${count} expected`);
  return { sizes, data, ...placement(fields) };
}

/** The origin and axes (i, j, k steps in mm) an NRRD header gives, null where it gives none. */
function placement(fields) {
  const axes = fields['space directions'] ? numbers(fields['space directions']) : null;
  const origin = fields['space origin'] ? numbers(fields['space origin']) : null;
  return { origin, axes: axes?.length === 9 ? [axes.slice(0, 3), axes.slice(3, 6), axes.slice(6)] : null };
}

async function gunzip(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Parse an answer's label, raw or gzip uint8 NRRD: as {@link parseNrrd}, plus `offset` ([i0, j0, k0]) and
 * `fullSize` ([I, J, K]) when it is a changed region (`medsam2_offset_ijk`, `medsam2_full_size_ijk`). */
export async function readLabel(buffer) {
  const bytes = new Uint8Array(buffer);
  const { fields, dataStart } = nrrdHeader(bytes);
  if (!['raw', 'gzip', 'gz'].includes(fields.encoding)) throw new Error(`NRRD encoding ${fields.encoding}`);
  checkUint8(fields);
  const sizes = fields.sizes.split(/\s+/).map(Number);
  const count = sizes.reduce((a, b) => a * b, 1);
  const body = bytes.subarray(dataStart);
  const data = fields.encoding === 'raw' ? body.subarray(0, count) : await gunzip(body);
  if (data.length !== count) throw new Error(`NRRD data has ${data.length} voxels, ${count} expected`);
  const offset = fields.medsam2_offset_ijk ? numbers(fields.medsam2_offset_ijk) : null;
  const fullSize = fields.medsam2_full_size_ijk ? numbers(fields.medsam2_full_size_ijk) : null;
  return { sizes, data, offset, fullSize, ...placement(fields) };
}

/** Why a changed region (from {@link readLabel}) does not lie on `grid`, or null when it does: the whole
 * label's size is the series', the box is inside it, and its origin is the series' voxel at its offset. */
export function regionMismatch(region, grid) {
  const full = region.fullSize ?? [];
  if (full.join(' ') !== grid.dimensions.join(' ')) {
    return `its image size ${full.join('×')} is not the series' ${grid.dimensions.join('×')}`;
  }
  if (region.offset.some((o, a) => o < 0 || o + region.sizes[a] > full[a])) return 'its box leaves the image';
  if (!region.origin) return null;
  const at = [0, 1, 2].map(c =>
    grid.origin[c] + [0, 1, 2].reduce((sum, a) => sum + region.offset[a] * grid.spacing[a] * grid.direction[3 * a + c], 0)
  );
  return gridMismatch({ ...region, sizes: grid.dimensions, origin: region.origin }, { ...grid, origin: at });
}

/** Why the label does not lie on `grid` (dimensions, spacing, origin, direction), or null when it does: the
 * same voxels at the same places (within 1 % of a voxel). */
export function gridMismatch(label, grid) {
  if (label.sizes.join(' ') !== grid.dimensions.join(' ')) {
    return `its size ${label.sizes.join('×')} is not the series' ${grid.dimensions.join('×')}`;
  }
  if (!label.origin || !label.axes) return null; // nothing more to compare
  const tolerance = 0.01 * Math.min(...grid.spacing);
  const far = (a, b) => a.some((v, n) => Math.abs(v - b[n]) > tolerance);
  if (far(label.origin, grid.origin)) return `its origin ${label.origin} is not the series' ${grid.origin}`;
  for (let a = 0; a < 3; a++) {
    const step = grid.direction.slice(3 * a, 3 * a + 3).map(d => d * grid.spacing[a]);
    if (far(label.axes[a], step)) return `its axis ${'ijk'[a]} ${label.axes[a]} is not the series' ${step}`;
  }
  return null;
}

const vector = values => `(${values.map(v => Number(v).toPrecision(12)).join(',')})`;

/**
 * A raw uint8 NRRD of `data` (i fastest) on the grid of a cornerstone volume: dimensions [i, j, k], spacing,
 * origin and direction (9 numbers, the i, j and k axes as rows) in LPS patient coordinates.
 */
export function writeNrrd(data, { dimensions, spacing, origin, direction }) {
  const axes = [0, 1, 2].map(a => [0, 1, 2].map(c => direction[3 * a + c] * spacing[a]));
  const header = [
    'NRRD0004',
    'type: uint8',
    'dimension: 3',
    'space: left-posterior-superior',
    `sizes: ${dimensions.join(' ')}`,
    `space directions: ${axes.map(vector).join(' ')}`,
    'kinds: domain domain domain',
    'endian: little',
    'encoding: raw',
    `space origin: ${vector(origin)}`,
    '',
    '',
  ].join('\n');
  const head = new TextEncoder().encode(header);
  const out = new Uint8Array(head.length + data.length);
  out.set(head, 0);
  out.set(data, head.length);
  return out;
}
