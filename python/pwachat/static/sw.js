// pwachat service worker, served at /sw.js so that its scope is the whole origin.
// The app shell is precached and served cache-first, so the page opens offline and can then say
// that the backend is unreachable. /api/* is never answered from here: no respondWith, no cache,
// so streams, rate-limit headers and errors always come live from the network.

// Bump with every change to a shell file: cache-first means clients see new files only when
// this file changes (browsers re-check /sw.js on navigation) and a new cache is filled.
const VERSION = 'v4';
const PREFIX = 'pwachat-shell-';
const CACHE = PREFIX + VERSION;
const SHELL = [
  '/',
  '/static/app.js',
  '/static/markdown.js',
  '/static/app.css',
  '/manifest.webmanifest',
  '/static/icon.svg',
  '/static/icon-192.png',
  '/static/icon-512.png',
];

self.addEventListener('install', (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      // cache: 'reload' skips the HTTP cache, so a new version never precaches stale files.
      .then((cache) => cache.addAll(SHELL.map((url) => new Request(url, { cache: 'reload' }))))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    caches
      .keys()
      // Only our own old versions: other caches on this origin are not ours to delete.
      .then((keys) => Promise.all(keys.filter((k) => k.startsWith(PREFIX) && k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener('fetch', (event) => {
  const { request } = event;
  const url = new URL(request.url);
  if (request.method !== 'GET' || url.origin !== self.location.origin) return;
  if (url.pathname === '/api' || url.pathname.startsWith('/api/')) return; // network, untouched
  // A navigation to "/" with any query string is the same page; other paths must be shell files.
  const key = request.mode === 'navigate' && url.pathname === '/' ? '/' : SHELL.includes(url.pathname) ? url.pathname : null;
  if (key === null) return;
  event.respondWith(
    caches
      .open(CACHE)
      .then((cache) => cache.match(key))
      .then((hit) => hit || fetch(request)),
  );
});
