// The MedSAM2 side panel (rendered by the panel's own React root, see index.jsx).

import React, { useEffect, useState } from 'react';
import { addLabelName, openSaved } from './labels.js';

const KINDS = [
  ['box', 'Box'],
  ['click', 'Click'],
  ['scribble', 'Scribble'],
  ['lasso', 'Lasso'],
];

const css = {
  panel: { padding: 8, color: '#d8e1ea', fontSize: 13, display: 'flex', flexDirection: 'column', gap: 8 },
  row: { display: 'flex', gap: 4, flexWrap: 'wrap', alignItems: 'center' },
  title: { fontSize: 11, textTransform: 'uppercase', color: '#7bb2ce', marginTop: 4 },
  button: on => ({
    padding: '3px 8px', borderRadius: 4, cursor: 'pointer', border: '1px solid #3a5a78',
    background: on ? '#348cfd' : '#0b1a2a', color: on ? '#fff' : '#d8e1ea',
  }),
  error: { color: '#ff8a80', whiteSpace: 'pre-wrap' },
  select: { background: '#0b1a2a', color: '#d8e1ea', border: '1px solid #3a5a78', borderRadius: 4, padding: 3 },
  list: { maxHeight: 180, overflowY: 'auto', border: '1px solid #26384a', borderRadius: 4 },
  entry: { display: 'flex', justifyContent: 'space-between', padding: '2px 6px', cursor: 'pointer' },
};

function Button({ on, title, onClick, disabled, children, name }) {
  return (
    <button type="button" style={css.button(on)} title={title} onClick={onClick} disabled={disabled} data-medsam2={name}>
      {children}
    </button>
  );
}

function ConfidenceList({ run, label, jump }) {
  if (!run || run.model !== 'medsam2_3d') return null;
  const check = run.answer.check_slices?.[label] ?? [];
  const scores = Object.entries(run.answer.confidence?.[label] ?? {})
    .map(([k, score]) => [Number(k), score])
    .sort((a, b) => a[0] - b[0]);
  return (
    <div data-medsam2="confidence">
      <div style={css.title}>Check these slices ({label})</div>
      <div style={css.list} data-medsam2="check-slices">
        {check.length === 0 && <div style={css.entry}>none named</div>}
        {check.map(c => (
          <div key={c.slice} style={css.entry} onClick={() => jump(c.slice)} data-slice={c.slice} title={c.reason}>
            <span>slice {c.slice}</span>
            <span>{c.confidence.toFixed(2)}</span>
          </div>
        ))}
      </div>
      <div style={css.title}>Per-slice confidence</div>
      <div style={css.list} data-medsam2="slice-confidence">
        {scores.map(([k, score]) => (
          <div key={k} style={css.entry} onClick={() => jump(k)} data-slice={k}>
            <span>slice {k}</span>
            <span style={{ color: score < 0.5 ? '#ffb74d' : '#a5d6a7' }}>{score.toFixed(2)}</span>
          </div>
        ))}
      </div>
    </div>
  );
}

function PromptControls({ annotator, state }) {
  const { tool, polarity, dimension, live } = state;
  const set = change => annotator.update(change);
  return (
    <>
      <div style={css.title}>Prompt</div>
      <div style={css.row}>
        {KINDS.map(([kind, text]) => (
          <Button key={kind} name={`tool-${kind}`} on={tool === kind} onClick={() => annotator.setTool(tool === kind ? null : kind)}>
            {text}
          </Button>
        ))}
      </div>
      <div style={css.row}>
        <Button name="foreground" on={polarity === 'foreground'} onClick={() => set({ polarity: 'foreground' })}>Foreground</Button>
        <Button name="background" on={polarity === 'background'} onClick={() => set({ polarity: 'background' })}>Background</Button>
      </div>
      <div style={css.row}>
        <Button name="2d" on={dimension === '2d'} title="this slice" onClick={() => set({ dimension: '2d' })}>2D</Button>
        <Button name="3d" on={dimension === '3d'} title="propagate through the volume" onClick={() => set({ dimension: '3d' })}>3D</Button>
        <label style={{ marginLeft: 8 }}>
          <input type="checkbox" checked={live} onChange={e => set({ live: e.target.checked })} data-medsam2="live" /> live
        </label>
      </div>
      <RangeInput annotator={annotator} range={state.range} />
    </>
  );
}

/** 3D: propagate ±N slices around the prompted ones (empty: the whole axis). */
function RangeInput({ annotator, range }) {
  const change = e => {
    const n = e.target.value === '' ? null : Number(e.target.value);
    annotator.update({ range: Number.isInteger(n) && n >= 0 ? n : null });
  };
  return (
    <label style={css.row} title="3D: propagate only this many slices either side of the prompted slices">
      ± slices
      <input type="number" min="0" step="1" placeholder="all" value={range ?? ''} onChange={change} style={{ ...css.select, width: 60 }} data-medsam2="range" />
    </label>
  );
}

function Actions({ annotator, busy }) {
  return (
    <>
      <div style={css.row}>
        <Button name="run" on onClick={() => annotator.run()} disabled={busy}>Run</Button>
        <Button name="undo" title="Ctrl+Z" onClick={() => annotator.step(true)} disabled={busy}>Undo</Button>
        <Button name="redo" title="Ctrl+Y" onClick={() => annotator.step(false)} disabled={busy}>Redo</Button>
        <Button name="clear" title="drop the prompts not sent yet" onClick={() => annotator.clearPending()}>Clear</Button>
      </div>
      <div style={css.row}>
        <Button name="save" onClick={() => annotator.save()} disabled={busy}>Save label</Button>
      </div>
    </>
  );
}

function LabelChoice({ annotator, state }) {
  const { labels, label, newObject, busy } = state;
  const fresh = newObject.has(label);
  return (
    <>
      <div style={css.title}>Label</div>
      <select style={css.select} value={label ?? ''} onChange={e => annotator.update({ label: e.target.value })} data-medsam2="label">
        {labels.map(l => (
          <option key={l.name} value={l.name}>{l.name}</option>
        ))}
      </select>
      <div style={css.row}>
        <Button name="refine" on={!fresh} title="the next prompt corrects this label" onClick={() => annotator.setNewObject(false)}>Refine</Button>
        <Button name="new-object" on={fresh} title="the next prompt starts this label over" onClick={() => annotator.setNewObject(true)}>New object</Button>
        <Button name="reset-label" title="clear this label (Undo brings it back)" onClick={() => annotator.resetLabel()} disabled={busy}>Reset</Button>
      </div>
      <NewLabel annotator={annotator} />
    </>
  );
}

function NewLabel({ annotator }) {
  const [name, setName] = useState('');
  const add = async () => {
    await addLabelName(annotator, name);
    if (annotator.state.label === name.trim()) setName('');
  };
  return (
    <div style={css.row}>
      <input style={{ ...css.select, width: 110 }} placeholder="new label" value={name} onChange={e => setName(e.target.value)} data-medsam2="new-label-name" />
      <Button name="add-label" onClick={add}>Add</Button>
    </div>
  );
}

function SavedLabels({ annotator, saved, refineFrom }) {
  const [chosen, setChosen] = useState(0);
  if (!saved?.length) return null;
  const text = e => `${e.tag ?? 'label'} v${e.version ?? '?'} (${e.source ?? 'local'})${e.names?.length ? `: ${e.names.join(', ')}` : ''}`;
  return (
    <>
      <div style={css.title}>Saved labels</div>
      <select style={css.select} value={chosen} onChange={e => setChosen(Number(e.target.value))} data-medsam2="saved">
        {saved.map((e, n) => (
          <option key={e.refine_from ?? n} value={n}>{text(e)}</option>
        ))}
      </select>
      <div style={css.row}>
        <Button name="refine-saved" on={Boolean(refineFrom)} title="the next 3D prompt refines this saved label; saving writes a new version" onClick={() => openSaved(annotator, saved[chosen])}>
          Refine this
        </Button>
      </div>
    </>
  );
}

function ApiKey({ annotator, apiKey }) {
  if (annotator.bridge.authorizationHeader()?.Authorization) return null; // OHIF's own login is used
  return (
    <label style={css.row} title="sent as X-API-Key when OHIF has no login of its own">
      API key
      <input type="password" style={{ ...css.select, width: 120 }} value={apiKey} onChange={e => annotator.setApiKey(e.target.value)} data-medsam2="api-key" />
    </label>
  );
}

export default function Panel({ annotator }) {
  const [state, setState] = useState(annotator.state);
  useEffect(() => {
    setState(annotator.state); // an update between the first render and the subscription
    return annotator.subscribe(setState);
  }, [annotator]);
  const { label, busy, status, error, info, lastRun3d } = state;
  return (
    <div style={css.panel} className="medsam2Panel">
      <div data-medsam2="status">{busy ? '⏳ ' : ''}{status}</div>
      {info?.warning && <div style={css.error}>{info.warning}</div>}
      {error && <div style={css.error} data-medsam2="error">{error}</div>}
      <LabelChoice annotator={annotator} state={state} />
      <SavedLabels annotator={annotator} saved={state.saved} refineFrom={state.refineFrom} />
      <PromptControls annotator={annotator} state={state} />
      <Actions annotator={annotator} busy={busy} />
      {lastRun3d?.answer?.hint && <div data-medsam2="hint">{lastRun3d.answer.hint}</div>}
      <ConfidenceList run={lastRun3d} label={label} jump={k => annotator.bridge.jumpToSlice(k)} />
      <ApiKey annotator={annotator} apiKey={state.apiKey} />
    </div>
  );
}
