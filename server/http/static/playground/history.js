// The last results, kept in this browser's IndexedDB (never on the server): the input image, the mask and the
// outputs as blobs, with what produced them, for the before/after view.

const DB_NAME = "inpaint-playground";
const STORE = "results";
export const KEEP = 12;

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function open() {
  const req = indexedDB.open(DB_NAME, 1);
  req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
  return request(req);
}

async function withStore(mode, work) {
  const db = await open();
  try {
    const tx = db.transaction(STORE, mode);
    const done = new Promise((resolve, reject) => {
      tx.oncomplete = resolve;
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
    const result = await work(tx.objectStore(STORE));
    await done;
    return result;
  } finally {
    db.close();
  }
}

/** Every kept result, newest first. */
export async function listResults() {
  const all = await withStore("readonly", (store) => request(store.getAll()));
  return all.sort((a, b) => b.at - a.at);
}

/** Keep `entry` ({id, at, appId, steps, seed, prompt, input, mask, outputs: [Blob], ...}); drop the oldest past KEEP. */
export async function saveResult(entry) {
  const kept = await listResults();
  const stale = kept.slice(KEEP - 1).map((old) => old.id);
  await withStore("readwrite", async (store) => {
    for (const id of stale) store.delete(id);
    store.put(entry);
  });
}

export function clearResults() {
  return withStore("readwrite", (store) => request(store.clear()));
}

/** A data: or same-origin URL's bytes as a Blob (null when it cannot be read). */
export async function blobOf(url) {
  try {
    const response = await fetch(url);
    return response.ok ? await response.blob() : null;
  } catch {
    return null;
  }
}
