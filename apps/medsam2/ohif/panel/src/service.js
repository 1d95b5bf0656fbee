// The panel's state for one OHIF app: registered as OHIF's service `medsam2Service` by the extension (so no
// state lives at module level), entered and left by the mode, and shown by the panel module's host <div>.

import React from 'react';
import { createRoot } from 'react-dom/client';
import Panel from './Panel.jsx';
import { Annotator } from './annotator.js';
import { addApiKeyHeader, needsApiKey, storeApiKey, storedApiKey, takeApiKeyFromAddress } from './api_key.js';
import { ViewerBridge, cornerstoneLibraries } from './viewer.js';

export const SERVICE_NAME = 'medsam2Service';

/** Ctrl+Z / Ctrl+Y (Ctrl+Shift+Z): true for back, false for forward, null for any other key. */
function undoKey(event) {
  if (!(event.ctrlKey || event.metaKey) || event.target?.closest?.('input, textarea, select')) return null;
  const key = event.key.toLowerCase();
  if (key === 'z') return !event.shiftKey;
  return key === 'y' ? false : null;
}

/** One OHIF app's MedSAM2 panel: the annotator of the mode session and the React root showing it. */
export class MedSAM2Service {
  constructor(servicesManager, commandsManager, panelId) {
    this.servicesManager = servicesManager;
    this.commandsManager = commandsManager;
    this.panelId = panelId;
    this.annotator = null; // one per mode session
    this.host = null; // the panel's node while OHIF shows the panel
    this.root = null;
    this.teardown = [];
    this.apiKey = ''; // C5, see api_key.js
    this.ohifAuthorization = null; // OHIF's own getAuthorizationHeader, kept before ours replaces it
    this.onKey = this.onKey.bind(this);
    this.mount = this.mount.bind(this);
  }

  /** The OHIF service registration (ServicesManager.registerService). */
  static registration(panelId) {
    return {
      name: SERVICE_NAME,
      create: ({ servicesManager, commandsManager }) => new MedSAM2Service(servicesManager, commandsManager, panelId),
    };
  }

  /** At OHIF's start, before its study list asks the server: the tab's API key (from the address or kept),
   * or, where the server needs a login and neither OHIF nor the tab has one, a prompt for it (then a reload, so
   * that the study list asks again with it). */
  start() {
    const key = takeApiKeyFromAddress() || storedApiKey();
    if (key) {
      this.useApiKey(key);
      return;
    }
    const ownLogin = Boolean(globalThis.config?.oidc?.length);
    needsApiKey(ownLogin, key).then(needed => {
      const typed = needed ? globalThis.prompt('This MedSAM2 server needs a login: paste your API key') : '';
      if (!typed?.trim()) return;
      this.useApiKey(typed.trim());
      globalThis.location.reload();
    });
  }

  /** OHIF's own credentials ({Authorization: 'Bearer …'} of its login), or null when it has none. */
  ownAuthorizationHeader() {
    const auth = this.servicesManager.services.userAuthenticationService;
    const header = this.ohifAuthorization ? this.ohifAuthorization() : auth?.getAuthorizationHeader?.();
    return header?.Authorization ? { Authorization: header.Authorization } : null;
  }

  /** The key on OHIF's requests where OHIF has no token of its own (api_key.js), and on the panel's; kept for
   * the tab ('' removes it). */
  useApiKey(key) {
    const auth = this.servicesManager.services.userAuthenticationService;
    this.apiKey = key;
    storeApiKey(key);
    if (!auth?.setServiceImplementation) return;
    // OHIF's own implementation, kept once (calling the service's method from ours would call ours)
    this.ohifAuthorization ??= auth.serviceImplementation?._getAuthorizationHeader ?? (() => undefined);
    addApiKeyHeader(auth, this.ohifAuthorization, key);
  }

  render() {
    if (this.host && this.annotator && !this.root) {
      this.root = createRoot(this.host);
      this.root.render(React.createElement(Panel, { annotator: this.annotator }));
    }
  }

  unmount() {
    const old = this.root;
    this.root = null;
    if (old) setTimeout(() => old.unmount(), 0); // not while OHIF's React is committing
  }

  /** The ref callback of the panel module's host <div> (null when OHIF removes it). */
  mount(node) {
    if (node !== this.host) this.unmount();
    this.host = node;
    this.render();
  }

  /** Undo/redo keys, only while the MedSAM2 panel is shown: elsewhere Ctrl+Z is OHIF's own undo. */
  onKey(event) {
    const back = this.annotator && this.host ? undoKey(event) : null;
    if (back === null) return;
    event.preventDefault();
    event.stopPropagation();
    this.annotator.step(back);
  }

  /** The mode was entered: a new annotator, its viewer events, the panel. */
  enter() {
    const { cs, cst } = cornerstoneLibraries();
    const annotator = new Annotator(new ViewerBridge(this.servicesManager, this.commandsManager, this.panelId));
    this.annotator = annotator;
    annotator.update({ apiKey: this.apiKey });
    window.medsam2 = annotator; // for the console and the browser tests
    const completed = event => annotator.onAnnotationCompleted(event.detail?.annotation);
    cs.eventTarget.addEventListener(cst.Enums.Events.ANNOTATION_COMPLETED, completed);
    window.addEventListener('keydown', this.onKey, true);
    const grid = this.servicesManager.services.viewportGridService;
    const shown = () => annotator.viewChanged();
    const subscriptions = [grid.EVENTS.ACTIVE_VIEWPORT_ID_CHANGED, grid.EVENTS.GRID_STATE_CHANGED].map(name =>
      grid.subscribe(name, shown)
    );
    this.teardown.push(
      ...subscriptions.map(subscription => () => subscription.unsubscribe()),
      () => cs.eventTarget.removeEventListener(cst.Enums.Events.ANNOTATION_COMPLETED, completed),
      () => window.removeEventListener('keydown', this.onKey, true),
      () => annotator.close()
    );
    this.render();
    annotator.connect();
  }

  /** The mode was left. */
  exit() {
    while (this.teardown.length) this.teardown.pop()();
    this.unmount();
    this.annotator = null;
  }
}
