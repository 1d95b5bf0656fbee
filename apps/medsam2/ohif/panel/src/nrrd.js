// NRRD label volumes: the server answers raw uint8 NRRD (result_extension .nrrd, result_dtype uint8,
// result_compress false) and takes one back when a label is saved.

const decoder = new TextDecoder();

/** Parse a raw (uncompressed) uint8 NRRD: {sizes: [i, j, k], data: Uint8Array (i fastest)}. */
export function parseNrrd(buffer) {
  const bytes = new Uint8Array(buffer);
  let end = -1;
  for (let n = 0; n + 1 < bytes.length; n++) {
    if (bytes[n] === 10 && bytes[n + 1] === 10) {
      end = n;
      break;
    }
  }
  if (end < 0 || decoder.decode(bytes.subarray(0, 4)) !== 'NRRD') {
    throw new Error('the answer is not an NRRD label');
  }
  const fields = {};
  for (const line of decoder.decode(bytes.subarray(0, end)).split('\n').slice(1)) {
    const at = line.indexOf(': ');
    if (at > 0 && !line.startsWith('#')) fields[line.slice(0, at).trim()] = line.slice(at + 2).trim();
  }
  if (fields.encoding !== 'raw') throw new Error(`NRRD encoding ${fields.encoding} (raw expected)`);
  if (!['uint8', 'uchar', 'unsigned char', 'uint8_t'].includes(fields.type)) {
    throw new Error(`NRRD type ${fields.type} (uint8 expected)`);
  }
  const sizes = fields.sizes.split(/\s+/).map(Number);
  const count = sizes.reduce((a, b) => a * b, 1);
  const data = bytes.slice(end + 2, end + 2 + count);
  if (data.length !== count) throw new Error(`NRRD data has ${data.length} voxels, ${count} expected`);
  return { sizes, data };
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
