// The mode entry OHIF loads by URL (app-config.js `modes`): the same module instance as the extension.
export { mode as default } from './medsam2-ohif.js';
