// The OHIF/cornerstone side of the panel: the active viewport's series, its voxel grid as the server sees it,
// the drawing tools, and the labelmap the answers are written into. Everything that touches OHIF's services
// or cornerstone's globals is here.

import { PROMPT_TOOLS } from './prompts.js';

export const TOOL_GROUP_IDS = ['default', 'mpr'];
export const NAVIGATION_TOOL = 'WindowLevel';

/** cornerstone and cornerstoneTools as OHIF loaded them (read late: OHIF sets them when its viewer loads). */
export function cornerstoneLibraries() {
  const { cornerstone, cornerstoneTools } = window;
  if (!cornerstone || !cornerstoneTools) throw new Error('the OHIF viewer has not loaded cornerstone yet');
  return { cs: cornerstone, cst: cornerstoneTools };
}

/** The tool instances the panel adds to OHIF's tool groups (the scribble and lasso are freehand contours). */
export function promptToolBlocks() {
  const quiet = { calculateStats: false, getTextLines: () => [] };
  return {
    passive: [
      { toolName: PROMPT_TOOLS.box, configuration: { ...quiet } },
      { toolName: PROMPT_TOOLS.click, configuration: { ...quiet } },
      { toolName: PROMPT_TOOLS.scribble, parentTool: 'PlanarFreehandROI', configuration: { ...quiet, closeContourProximity: 0 } },
      { toolName: PROMPT_TOOLS.lasso, parentTool: 'PlanarFreehandROI', configuration: { ...quiet } },
    ],
  };
}

/** Grid of a series as the server stores it: slices sorted along the normal, k = 0 at the origin. */
export function seriesGrid(imageIds) {
  const { cs } = cornerstoneLibraries();
  // a copy: one of cornerstone's sorting paths reverses the array it is given in place
  const props = cs.utilities.generateVolumePropsFromImageIds([...imageIds], 'medsam2-grid');
  return {
    imageIds: props.imageIds,
    dimensions: props.dimensions,
    spacing: props.spacing,
    origin: Array.from(props.origin),
    direction: Array.from(props.direction),
  };
}

/** (i, j, k) of a world point (mm, patient LPS) on `grid`, not rounded. */
export function worldToVoxel(grid, point) {
  const d = [0, 1, 2].map(c => point[c] - grid.origin[c]);
  return [0, 1, 2].map(axis => {
    const dir = grid.direction.slice(3 * axis, 3 * axis + 3);
    return (d[0] * dir[0] + d[1] * dir[1] + d[2] * dir[2]) / grid.spacing[axis];
  });
}

/** World points of an annotation drawn by one of the panel's tools. */
export function annotationPoints(annotation) {
  const polyline = annotation.data?.contour?.polyline;
  if (polyline?.length) return polyline;
  return annotation.data?.handles?.points ?? [];
}

/** Talks to OHIF's services for one mode session. */
export class ViewerBridge {
  constructor(servicesManager, commandsManager, panelId) {
    this.services = servicesManager.services;
    this.commands = commandsManager;
    this.panelId = panelId;
    this.grids = new Map();
  }

  /** {viewportId, viewport, displaySet, grid} of the active viewport, or null when it shows no series. */
  active() {
    const { viewportGridService, cornerstoneViewportService, displaySetService } = this.services;
    const viewportId = viewportGridService.getActiveViewportId();
    const uid = viewportGridService.getDisplaySetsUIDsForViewport(viewportId)?.[0];
    const displaySet = uid ? displaySetService.getDisplaySetByUID(uid) : null;
    const viewport = cornerstoneViewportService.getCornerstoneViewport(viewportId);
    if (!displaySet || !viewport || displaySet.Modality === 'SEG') return null;
    if (!this.grids.has(uid)) {
      const imageIds = viewport.getImageIds?.() ?? displaySet.imageIds;
      if (!imageIds?.length) return null;
      try {
        this.grids.set(uid, seriesGrid(imageIds));
      } catch (e) {
        console.warn(`MedSAM2: no voxel grid for series ${displaySet.SeriesInstanceUID}`, e);
        return null; // not a volume (no positions or orientation): nothing to prompt on
      }
    }
    return { viewportId, viewport, displaySet, grid: this.grids.get(uid) };
  }

  /** The active view if it shows the series `displaySetInstanceUID`, else null. */
  showing(displaySetInstanceUID) {
    const view = this.active();
    return view?.displaySet.displaySetInstanceUID === displaySetInstanceUID ? view : null;
  }

  /** Make `kind` (box, click, scribble, lasso) the left-button tool, or the window/level tool for null. */
  selectTool(kind) {
    const toolName = kind ? PROMPT_TOOLS[kind] : NAVIGATION_TOOL;
    this.commands.runCommand('setToolActiveToolbar', { toolName, toolGroupIds: TOOL_GROUP_IDS });
  }

  /** The slice k the active viewport shows. */
  currentSlice() {
    const view = this.active();
    return view ? view.grid.imageIds.indexOf(view.viewport.getCurrentImageId()) : -1;
  }

  /** Show slice k of the active series. */
  async jumpToSlice(k) {
    const view = this.active();
    if (!view || k < 0 || k >= view.grid.imageIds.length) return;
    const imageId = view.grid.imageIds[k];
    const { viewport } = view;
    if (typeof viewport.setImageIdIndex === 'function' && viewport.getImageIds().includes(imageId)) {
      await viewport.setImageIdIndex(viewport.getImageIds().indexOf(imageId));
    } else {
      viewport.setViewReference({ referencedImageId: imageId });
    }
    viewport.render();
  }

  /** Colour an annotation (foreground green, background red, box yellow) and redraw. */
  styleAnnotation(annotation, colour, viewportId) {
    const { cst } = cornerstoneLibraries();
    const style = { color: colour, colorHighlighted: colour, colorSelected: colour, colorLocked: colour };
    cst.annotation.config.style.setAnnotationStyles(annotation.annotationUID, style);
    cst.utilities.triggerAnnotationRenderForViewportIds([viewportId]);
  }

  removeAnnotations(uids) {
    const { cst } = cornerstoneLibraries();
    for (const uid of uids) cst.annotation.state.removeAnnotation(uid);
    const view = this.active();
    if (view) cst.utilities.triggerAnnotationRenderForViewportIds([view.viewportId]);
  }

  segmentationId(view) {
    return `medsam2-${view.displaySet.displaySetInstanceUID}`;
  }

  /** True once the panel has a labelmap on `view`'s series (an answer was written there). */
  hasLabelmap(view) {
    return Boolean(this.services.segmentationService.getSegmentation(this.segmentationId(view)));
  }

  /** The panel's labelmap on the active series (one segment per app label), created on first use. */
  async labelmap(view, labels) {
    const { segmentationService } = this.services;
    const segmentationId = this.segmentationId(view);
    if (!this.hasLabelmap(view)) {
      const segments = Object.fromEntries(labels.map((l, n) => [l.value, { label: l.name, active: n === 0 }]));
      await segmentationService.createLabelmapForDisplaySet(view.displaySet, {
        segmentationId,
        label: 'MedSAM2',
        segments,
      });
    }
    await this.showLabelmap(view, segmentationId, labels);
    const labelmap = segmentationService.getSegmentation(segmentationId).representationData.Labelmap;
    const byImage = new Map(labelmap.referencedImageIds.map((r, n) => [r, labelmap.imageIds[n]]));
    return { segmentationId, sliceImage: k => byImage.get(view.grid.imageIds[k]) };
  }

  /** The viewports showing `view`'s series (the three of an MPR layout, or the one). */
  viewportsShowing(view) {
    const { viewportGridService } = this.services;
    const uid = view.displaySet.displaySetInstanceUID;
    const ids = [...(viewportGridService.getState().viewports?.values?.() ?? [])]
      .filter(v => v.displaySetInstanceUIDs?.includes(uid))
      .map(v => v.viewportId);
    return ids.includes(view.viewportId) ? ids : [view.viewportId, ...ids];
  }

  /** Show the panel's labelmap, in the labels' colours, on every viewport of the series that lacks it. */
  async showLabelmap(view, segmentationId, labels) {
    const { segmentationService } = this.services;
    let added = false;
    for (const viewportId of this.viewportsShowing(view)) {
      if (segmentationService.getSegmentationRepresentations(viewportId, { segmentationId })?.length) continue;
      await segmentationService.addSegmentationRepresentation(viewportId, { segmentationId });
      for (const l of labels) segmentationService.setSegmentColor(viewportId, segmentationId, l.value, [...l.color, 255]);
      added = true;
    }
    // OHIF's segmentation mode shows its own panel when the first segmentation appears: come back
    if (added) for (const ms of [0, 500]) setTimeout(() => this.services.panelService?.activatePanel(this.panelId, true), ms);
  }

  /** Voxels (Uint8Array, i fastest) of slice k of a labelmap from {@link labelmap}. */
  sliceVoxels(map, k) {
    const { cs } = cornerstoneLibraries();
    return cs.cache.getImage(map.sliceImage(k)).voxelManager.getScalarData();
  }

  labelmapChanged(map) {
    const { cst } = cornerstoneLibraries();
    cst.segmentation.triggerSegmentationEvents.triggerSegmentationDataModified(map.segmentationId);
  }

  /** OHIF's own credentials for its requests ({Authorization: 'Bearer …'}), or null when it has none. */
  authorizationHeader() {
    return this.services.medsam2Service?.ownAuthorizationHeader() ?? null;
  }

  /** OHIF's DICOMweb requests (to the app's proxy) carry `X-API-Key: key` (C5), unless OHIF has a login of
   * its own (its Bearer token then goes, as always); kept for the tab (api_key.js). */
  useApiKey(key) {
    this.services.medsam2Service?.useApiKey(key);
  }

  notify(type, title, message) {
    this.services.uiNotificationService?.show({ title, message, type, duration: type === 'error' ? 8000 : 3000 });
  }
}
