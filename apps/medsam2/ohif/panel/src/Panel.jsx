// The MedSAM2 side panel (rendered by the panel's own React root, see index.jsx).

import React, { useEffect, useState } from 'react';

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
    </>
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

function LabelChoice({ annotator, labels, label }) {
  return (
    <>
      <div style={css.title}>Label</div>
      <select style={css.select} value={label ?? ''} onChange={e => annotator.update({ label: e.target.value })} data-medsam2="label">
        {labels.map(l => (
          <option key={l.name} value={l.name}>{l.name}</option>
        ))}
      </select>
    </>
  );
}

export default function Panel({ annotator }) {
  const [state, setState] = useState(annotator.state);
  useEffect(() => {
    setState(annotator.state); // an update between the first render and the subscription
    return annotator.subscribe(setState);
  }, [annotator]);
  const { labels, label, busy, status, error, info, lastRun3d } = state;
  return (
    <div style={css.panel} className="medsam2Panel">
      <div data-medsam2="status">{busy ? '⏳ ' : ''}{status}</div>
      {info?.warning && <div style={css.error}>{info.warning}</div>}
      {error && <div style={css.error} data-medsam2="error">{error}</div>}
      <LabelChoice annotator={annotator} labels={labels} label={label} />
      <PromptControls annotator={annotator} state={state} />
      <Actions annotator={annotator} busy={busy} />
      {lastRun3d?.answer?.hint && <div data-medsam2="hint">{lastRun3d.answer.hint}</div>}
      <ConfidenceList run={lastRun3d} label={label} jump={k => annotator.bridge.jumpToSlice(k)} />
    </div>
  );
}
