// The MedSAM2 OHIF extension and mode, loaded at run time by OHIF's release (app-config.js lists this file).
// OHIF renders the panel with its own React; the panel mounts its UI into a node with this bundle's React
// (hooks must not cross React copies), so the only thing handed to OHIF is a host <div> element. The panel's
// state lives in the OHIF service the extension registers (service.js).

import React from 'react';
import { MedSAM2Service, SERVICE_NAME } from './service.js';
import { promptToolBlocks } from './viewer.js';

export const EXTENSION_ID = 'medsam2';
export const PANEL_ID = `${EXTENSION_ID}.panelModule.medsam2`;
const BASE_MODE = '@ohif/mode-segmentation';

const serviceOf = servicesManager => servicesManager.services[SERVICE_NAME];

const extension = {
  id: EXTENSION_ID,
  preRegistration({ servicesManager }) {
    servicesManager.registerService(MedSAM2Service.registration(PANEL_ID));
    serviceOf(servicesManager).start();
  },
  getPanelModule({ servicesManager }) {
    const PanelHost = () =>
      React.createElement('div', { ref: serviceOf(servicesManager).mount, style: { height: '100%', overflowY: 'auto' } });
    return [{ name: 'medsam2', iconName: 'tab-segmentation', iconLabel: 'MedSAM2', label: 'MedSAM2', component: PanelHost }];
  },
};

/** The mode's route: the base mode's, with the panel first on the right. */
function medsam2Route(route) {
  const layout = route.layoutInstance;
  const props = { ...layout.props, rightPanels: [PANEL_ID, ...layout.props.rightPanels] };
  return { ...route, layoutInstance: { ...layout, props } };
}

/** The MedSAM2 mode: OHIF's segmentation mode with the panel first on the right and the prompt tools added. */
export const mode = {
  id: 'medsam2-mode',
  async modeFactory({ loadModules }) {
    const [segmentation] = await loadModules([BASE_MODE]);
    const base = segmentation.modeInstance;
    const tools = promptToolBlocks();
    return {
      ...base,
      id: 'medsam2-mode',
      routeName: 'medsam2',
      displayName: 'MedSAM2',
      toolGroupAdditions: { ...base.toolGroupAdditions, default: [tools], mpr: [tools] },
      routes: [medsam2Route(base.routes[0])],
      onModeEnter(context) {
        base.onModeEnter.call(this, context);
        serviceOf(context.servicesManager).enter();
      },
      onModeExit(context) {
        serviceOf(context.servicesManager).exit();
        base.onModeExit.call(this, context);
      },
    };
  },
};

export default extension;
