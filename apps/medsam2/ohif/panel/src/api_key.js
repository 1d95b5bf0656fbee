// The API key of a viewer with no login of its own (C5): OHIF's DICOMweb requests to the app's proxy and the
// panel's requests carry it as `X-API-Key`. It is kept for the browser tab (sessionStorage), so it is there
// before OHIF's study list asks the proxy, and given either in the address's fragment
// (`#medsam2-api-key=...`: a fragment never reaches a server or its logs) or, when the server needs a login and
// OHIF has none, typed once into the prompt the viewer shows at start.

const STORAGE_KEY = 'medsam2.apiKey';
const FRAGMENT_KEY = 'medsam2-api-key';

/** The key kept for this tab ('' for none, or where the browser keeps no storage). */
export function storedApiKey(storage = globalThis.sessionStorage) {
  try {
    return storage?.getItem(STORAGE_KEY) ?? '';
  } catch {
    return '';
  }
}

/** Keep `key` for this tab ('' forgets it). */
export function storeApiKey(key, storage = globalThis.sessionStorage) {
  try {
    if (key) storage?.setItem(STORAGE_KEY, key);
    else storage?.removeItem(STORAGE_KEY);
  } catch {
    // no storage (private mode, policy): the key lasts as long as the page
  }
}

/** A key in the address's fragment, taken out of the address bar ('' when there is none). */
export function takeApiKeyFromAddress(location = globalThis.location, history = globalThis.history) {
  const fragment = new URLSearchParams((location?.hash ?? '').replace(/^#/, ''));
  const key = fragment.get(FRAGMENT_KEY) ?? '';
  if (key) {
    fragment.delete(FRAGMENT_KEY);
    const rest = fragment.toString();
    history?.replaceState(history.state, '', `${location.pathname}${location.search}${rest ? `#${rest}` : ''}`);
  }
  return key;
}

/** `auth` (OHIF's userAuthenticationService) giving `Authorization: Bearer <key>` where OHIF has no token of its
 * own (OHIF's DICOMweb client keeps only that header of its credentials; the server takes an API key there);
 * `ohif` is OHIF's own implementation of getAuthorizationHeader. */
export function addApiKeyHeader(auth, ohif, key) {
  auth.setServiceImplementation({
    getAuthorizationHeader: () => {
      const header = ohif();
      return header?.Authorization || !key ? header : { ...(header ?? {}), Authorization: `Bearer ${key}` };
    },
  });
}

/** Whether the server needs a login (GET /auth/, open to all) and this viewer has no way to give one. */
export async function needsApiKey(hasOwnLogin, key, request = globalThis.fetch) {
  if (hasOwnLogin || key) return false;
  try {
    const response = await request('/auth/');
    return response.ok && (await response.json()).enabled === true;
  } catch {
    return false; // the panel shows the server's state once a study is open
  }
}
