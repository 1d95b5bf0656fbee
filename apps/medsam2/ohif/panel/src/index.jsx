// The MedSAM2 OHIF extension and mode, loaded at run time by OHIF's release (app-config.js lists this file).
// OHIF renders the panel with its own React; the panel mounts its UI into a node with this bundle's React
// (hooks must not cross React copies), so the only thing handed to OHIF is a host <div> element.

import React from 'react';
import { createRoot } from 'react-dom/client';
import Panel from './Panel.jsx';
import { Annotator } from './annotator.js';
import { ViewerBridge, cornerstoneLibraries, promptToolBlocks } from './viewer.js';

export const EXTENSION_ID = 'medsam2';
export const PANEL_ID = `${EXTENSION_ID}.panelModule.medsam2`;
const BASE_MODE = '@ohif/mode-segmentation';

let annotator = null; // one per mode session
let host = null; // the panel's node while OHIF shows the panel
let root = null;
const teardown = [];

function renderPanel() {
  if (host && annotator && !root) {
    root = createRoot(host);
    root.render(<Panel annotator={annotator} />);
  }
}

function unmountPanel() {
  const old = root;
  root = null;
  if (old) setTimeout(() => old.unmount(), 0); // not while OHIF's React is committing
}

function mountPanel(node) {
  if (node !== host) unmountPanel();
  host = node;
  renderPanel();
}

function PanelHost() {
  return React.createElement('div', { ref: mountPanel, style: { height: '100%', overflowY: 'auto' } });
}

function onKey(event) {
  const target = event.target;
  // only while the MedSAM2 panel is shown: elsewhere Ctrl+Z is OHIF's own undo (brushes, measurements)
  if (!annotator || !host || !(event.ctrlKey || event.metaKey) || target?.closest?.('input, textarea, select')) return;
  const key = event.key.toLowerCase();
  const back = key === 'z' && !event.shiftKey;
  const forward = key === 'y' || (key === 'z' && event.shiftKey);
  if (!back && !forward) return;
  event.preventDefault();
  event.stopPropagation();
  annotator.step(back);
}

function enter({ servicesManager, commandsManager }) {
  const { cs, cst } = cornerstoneLibraries();
  annotator = new Annotator(new ViewerBridge(servicesManager, commandsManager, PANEL_ID));
  window.medsam2 = annotator; // for the console and the browser tests
  const completed = event => annotator?.onAnnotationCompleted(event.detail?.annotation);
  cs.eventTarget.addEventListener(cst.Enums.Events.ANNOTATION_COMPLETED, completed);
  window.addEventListener('keydown', onKey, true);
  const grid = servicesManager.services.viewportGridService;
  const shown = () => annotator?.update({ lastRun3d: annotator.imageState()?.lastRun3d ?? null });
  const subscriptions = [grid.EVENTS.ACTIVE_VIEWPORT_ID_CHANGED, grid.EVENTS.GRID_STATE_CHANGED].map(name =>
    grid.subscribe(name, shown)
  );
  teardown.push(
    ...subscriptions.map(subscription => () => subscription.unsubscribe()),
    () => cs.eventTarget.removeEventListener(cst.Enums.Events.ANNOTATION_COMPLETED, completed),
    () => window.removeEventListener('keydown', onKey, true)
  );
  renderPanel();
  annotator.connect();
}

function exit() {
  while (teardown.length) teardown.pop()();
  unmountPanel();
  annotator = null;
}

const extension = {
  id: EXTENSION_ID,
  getPanelModule: () => [
    { name: 'medsam2', iconName: 'tab-segmentation', iconLabel: 'MedSAM2', label: 'MedSAM2', component: PanelHost },
  ],
};

/** The MedSAM2 mode: OHIF's segmentation mode with the panel first on the right and the prompt tools added. */
export const mode = {
  id: 'medsam2-mode',
  async modeFactory({ loadModules }) {
    const [segmentation] = await loadModules([BASE_MODE]);
    const base = segmentation.modeInstance;
    const route = base.routes[0];
    const layout = route.layoutInstance;
    const tools = promptToolBlocks();
    return {
      ...base,
      id: 'medsam2-mode',
      routeName: 'medsam2',
      displayName: 'MedSAM2',
      toolGroupAdditions: { ...base.toolGroupAdditions, default: [tools], mpr: [tools] },
      routes: [
        { ...route, layoutInstance: { ...layout, props: { ...layout.props, rightPanels: [PANEL_ID, ...layout.props.rightPanels] } } },
      ],
      onModeEnter(context) {
        base.onModeEnter.call(this, context);
        enter(context);
      },
      onModeExit(context) {
        exit();
        base.onModeExit.call(this, context);
      },
    };
  },
};

export default extension;
