// OHIF configuration for the MedSAM2 app: served at /ohif/app-config.js in place of the release's own.
// DICOMweb goes through the app's proxy (/proxy/dicom/...), so the viewer reaches whatever PACS the server
// was started with (--studies http(s)://.../dicom-web), on the server's own origin.
window.config = {
  // no trailing slash: OHIF's login (oidc) finds its /callback route by cutting this from the redirect URI
  routerBasename: '/ohif',
  showStudyList: true,
  extensions: ['/ohif/medsam2-ohif.js'],
  modes: ['/ohif/medsam2-mode.js'],
  customizationService: {},
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  maxNumberOfWebWorkers: 2,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'PACS (through the MedSAM2 server)',
        name: 'medsam2-proxy',
        wadoUriRoot: '/proxy/dicom/wado',
        qidoRoot: '/proxy/dicom/qido',
        wadoRoot: '/proxy/dicom/wado',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
