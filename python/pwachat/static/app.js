// pwachat reference client: one ES module, no build step, no framework.
// The page runs under a strict CSP (no inline script or style), so every handler is wired here,
// and model output only ever reaches the DOM as text (Text nodes / textContent), never as HTML.

const HISTORY_MAX = 50; // the contract's default MAX_HISTORY_MESSAGES: more is refused
const CONTENT_MAX = 4000; // the default MAX_MESSAGE_CHARS, which also bounds each history item
const STORE_MAX = 200; // kept on screen and in localStorage; only the last HISTORY_MAX are sent
const RETRY_MS = 10_000;
const KEY = { history: 'pwachat.history', choice: 'pwachat.choice', token: 'pwachat.token' };

// WHATWG "interpret an event stream": CR, LF or CRLF end a line, a blank line dispatches,
// `data` lines join with "\n", comments (the server's ": ping") are ignored, and the last
// event id persists across events. Exported so that it can be tested on its own.
// (TextDecoder already drops a leading BOM, so the parser does not look for one.)
export class SSEParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buf = '';
    this.afterCR = false; // a chunk ended in CR: an LF opening the next chunk belongs to it
    this.type = '';
    this.data = '';
    this.lastEventId = '';
  }

  feed(text) {
    if (!text) return;
    if (this.afterCR && text[0] === '\n') text = text.slice(1);
    this.afterCR = false;
    this.buf += text;
    const eol = /\r\n|\r|\n/g;
    let start = 0;
    for (let m; (m = eol.exec(this.buf)); ) {
      this.line(this.buf.slice(start, m.index));
      start = eol.lastIndex;
      if (m[0] === '\r' && start === this.buf.length) this.afterCR = true;
    }
    this.buf = this.buf.slice(start); // an unfinished line waits for the next chunk
  }

  line(line) {
    if (line === '') return this.dispatch();
    if (line[0] === ':') return; // comment
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'event') this.type = value;
    else if (field === 'data') this.data += value + '\n';
    else if (field === 'id' && !value.includes('\0')) this.lastEventId = value;
    // `retry` only steers EventSource reconnection, which a POSTed stream never does.
  }

  dispatch() {
    const { type, data } = this;
    this.type = '';
    this.data = '';
    if (data === '') return; // an event without data lines is dropped, per the spec
    this.onEvent({ type: type || 'message', data: data.slice(0, -1), lastEventId: this.lastEventId });
  }
}

const $ = (id) => document.getElementById(id);
let ui; // the page's elements, looked up once in main()
let models = []; // from GET /api/models; empty means "cannot send"
let defaultProvider = null;
let history = []; // [{role, content}] of finished turns, oldest first
let controller = null; // AbortController of the stream in flight
let retryTimer = 0;
let chat = 0; // bumped by "New chat", so that a stream it aborted does not write into the new one

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback; // storage disabled or a corrupt value: start afresh
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // Full or disabled storage: the chat still works, it just will not survive a reload.
  }
}

const isTurn = (m) => m && (m.role === 'user' || m.role === 'assistant') && typeof m.content === 'string';

function setState(state) {
  document.body.dataset.state = state; // loading | ready | unavailable | streaming (for tests and CSS)
  const busy = state === 'streaming';
  ui.send.disabled = busy || models.length === 0;
  ui.stop.disabled = !busy;
}

function setStatus(text, kind = 'info') {
  ui.status.textContent = text;
  ui.status.dataset.kind = text ? kind : '';
}

function authHeaders(extra = {}) {
  const token = ui.token.value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

// Seconds from Retry-After, which may be delta-seconds (what pwachat sends) or an HTTP date.
function retryAfter(res) {
  const raw = (res.headers.get('Retry-After') || '').trim();
  if (!raw) return null;
  const s = /^\d+$/.test(raw) ? Number(raw) : Math.ceil((Date.parse(raw) - Date.now()) / 1000);
  return Number.isFinite(s) ? Math.max(1, s) : null;
}

// A readable line for a non-2xx answer: the contract's envelope carries `error.message`.
async function errorText(res) {
  let message = '';
  try {
    message = (await res.json())?.error?.message || '';
  } catch {
    // Not JSON (a proxy's HTML page, say): fall back to the status line.
  }
  const wait = retryAfter(res);
  if (res.status === 429) return wait ? `Rate limit reached — try again in ${wait} s` : 'Rate limit reached — try again later';
  if (res.status === 401) {
    ui.settings.open = true; // the token field is the way out
    return `${message || 'Unauthorized'} — enter an access token under Settings.`;
  }
  const text = message || `The server answered ${res.status} ${res.statusText}`.trim();
  return wait ? `${text} — try again in ${wait} s` : text; // e.g. 503 upstream_rate_limited
}

function showQuota(remaining, limit, reset) {
  if (remaining === null || remaining === undefined) return;
  ui.quota.textContent = `${remaining}${limit ? `/${limit}` : ''} left`;
  ui.quota.title = `Requests left in the tightest rate-limit window${reset ? `; a slot frees in ${reset} s` : ''}`;
}

function quotaFromHeaders(res) {
  const h = (name) => res.headers.get(name);
  showQuota(h('X-RateLimit-Remaining'), h('X-RateLimit-Limit'), h('X-RateLimit-Reset'));
}

// GET /api/rate-limit is not itself limited, so the quota can show before the first message.
async function refreshQuota() {
  try {
    const res = await fetch('/api/rate-limit', { headers: authHeaders(), cache: 'no-store' });
    if (!res.ok) return;
    const { limits = {}, remaining = {}, reset_s: reset = {} } = await res.json();
    const tightest = Object.keys(remaining).sort((a, b) => remaining[a] - remaining[b])[0];
    if (tightest) showQuota(remaining[tightest], limits[tightest], reset[tightest]);
  } catch {
    // Only decoration: the models probe reports an unreachable backend.
  }
}

// ---- providers and models ------------------------------------------------------------------

// The server's provider table names each provider (`label` in /api/models), custom ones too.
function providerLabel(p) {
  return models.find((m) => m.provider === p && m.label)?.label ?? p;
}

function fillPickers() {
  const providers = [...new Set(models.map((m) => m.provider))];
  const saved = load(KEY.choice, {});
  const pick = [saved.provider, defaultProvider].find((p) => providers.includes(p)) ?? providers[0];
  ui.provider.replaceChildren(...providers.map((p) => new Option(providerLabel(p), p)));
  ui.provider.value = pick ?? '';
  fillModels(saved.model);
}

function fillModels(preferred) {
  const list = models.filter((m) => m.provider === ui.provider.value);
  ui.model.replaceChildren(...list.map((m) => new Option(m.default ? `${m.id} (default)` : m.id, m.id)));
  const pick = list.find((m) => m.id === preferred) ?? list.find((m) => m.default) ?? list[0];
  ui.model.value = pick?.id ?? '';
  ui.provider.disabled = ui.model.disabled = list.length === 0;
}

function rememberChoice() {
  save(KEY.choice, { provider: ui.provider.value, model: ui.model.value });
}

// The backend answers /api/models or we cannot send: say so, keep the shell usable, retry.
async function loadModels() {
  clearTimeout(retryTimer);
  ui.retry.hidden = true;
  let res;
  try {
    res = await fetch('/api/models', { headers: authHeaders(), cache: 'no-store' });
  } catch {
    return unavailable(`The backend is unreachable. Retrying every ${RETRY_MS / 1000} s…`);
  }
  if (!res.ok) return unavailable(await errorText(res), res.status !== 401); // a token will not appear by waiting
  const body = await res.json();
  models = Array.isArray(body.models) ? body.models : [];
  defaultProvider = body.default_provider;
  if (models.length === 0) return unavailable('No provider can answer right now. Retrying…');
  fillPickers();
  if (ui.status.dataset.kind === 'offline') setStatus('');
  if (!controller) setState('ready');
  refreshQuota();
}

function unavailable(text, retry = true) {
  models = [];
  fillPickers();
  setStatus(text, 'offline');
  ui.retry.hidden = false;
  if (!controller) setState('unavailable');
  if (retry) retryTimer = setTimeout(loadModels, RETRY_MS);
}

// ---- conversation ----------------------------------------------------------------------------

function addBubble(role, text, label) {
  const el = document.createElement('div');
  el.className = `message ${role}`;
  el.dataset.label = label ?? (role === 'user' ? 'You' : 'Assistant');
  el.append(document.createTextNode(text)); // text, never HTML
  ui.messages.append(el);
  return el;
}

const nearBottom = () => ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
const scrollDown = () => (ui.messages.scrollTop = ui.messages.scrollHeight);

// What the contract accepts as `history`: at most HISTORY_MAX items, oldest dropped, no empty
// contents (refused after sanitising), each within CONTENT_MAX code points.
function outgoingHistory() {
  return history
    .map(({ role, content }) => ({ role, content: Array.from(content.trim()).slice(0, CONTENT_MAX).join('') }))
    .filter((m) => m.content !== '')
    .slice(-HISTORY_MAX);
}

function keep(...turns) {
  history = [...history, ...turns].slice(-STORE_MAX);
  save(KEY.history, history);
}

async function send(text) {
  const thisChat = chat;
  const provider = ui.provider.value;
  const model = ui.model.value;
  const userEl = addBubble('user', text);
  const botEl = addBubble('assistant', '', `${providerLabel(provider)} · ${model}`);
  const out = botEl.firstChild;
  botEl.setAttribute('aria-busy', 'true'); // screen readers announce the answer once it is complete
  scrollDown();
  setStatus('');
  controller = new AbortController();
  setState('streaming');

  let answer = '';
  let failure = null;
  let finish = null;
  let res = null;
  try {
    res = await fetch('/api/chat/stream', {
      method: 'POST',
      headers: authHeaders({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
      body: JSON.stringify({ message: text, provider, model, history: outgoingHistory() }),
      signal: controller.signal,
      cache: 'no-store',
    });
    quotaFromHeaders(res);
    if (!res.ok || !res.body) {
      failure = await errorText(res);
    } else {
      const parser = new SSEParser(({ type, data }) => {
        let payload;
        try {
          payload = JSON.parse(data);
        } catch {
          return; // not ours to interpret
        }
        if (type === 'start') botEl.dataset.label = `${providerLabel(payload.provider)} · ${payload.model}`;
        else if (type === 'delta' && payload.content) {
          const stick = nearBottom(); // follow the answer unless the reader scrolled up
          answer += payload.content;
          out.appendData(payload.content);
          if (stick) scrollDown();
        } else if (type === 'done') finish = payload.finish_reason || 'stop';
        else if (type === 'error') failure = payload.error?.message || 'The provider failed mid-answer.';
      });
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      while (!finish && !failure) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(decoder.decode(value, { stream: true }));
      }
      parser.feed(decoder.decode());
      reader.cancel().catch(() => {}); // after a terminal event the rest is only the close
      if (!finish && !failure) failure = 'The connection closed before the answer was complete.';
    }
  } catch (err) {
    if (err.name !== 'AbortError') {
      failure = res ? 'The connection to the backend was lost.' : 'The backend is unreachable. Check your connection and try again.';
      if (!res) loadModels(); // re-probe: disables Send and retries if the backend is really gone
    }
  } finally {
    controller = null;
    botEl.removeAttribute('aria-busy');
    setState(models.length ? 'ready' : 'unavailable');
  }

  if (thisChat !== chat) return;
  const stopped = !finish && !failure;
  if (answer) {
    keep({ role: 'user', content: text }, { role: 'assistant', content: answer });
    if (!finish) botEl.classList.add('partial'); // what arrived is kept, marked as cut off
  } else if (finish) {
    keep({ role: 'user', content: text }); // an empty answer is not history
    botEl.remove();
  } else {
    // Nothing came back: the question was not answered, so it is not history. Offer it again.
    botEl.remove();
    userEl.classList.add('failed');
    if (!ui.message.value) ui.message.value = text;
  }
  if (failure) setStatus(failure, 'error');
  else if (stopped) setStatus('Stopped.');
  else if (finish === 'length') setStatus('The answer was cut short at the token limit.');
  else if (finish === 'content_filter') setStatus('The provider stopped the answer (content filter).');
  else if (!answer) setStatus('The model returned an empty answer.');
  if (document.activeElement === document.body || document.activeElement === ui.stop) ui.message.focus();
}

function newChat() {
  chat += 1;
  controller?.abort();
  history = [];
  save(KEY.history, history);
  ui.messages.replaceChildren();
  if (ui.status.dataset.kind !== 'offline') setStatus('');
  ui.message.focus();
}

function main() {
  ui = {
    provider: $('provider'), model: $('model'), message: $('message'), send: $('send'), stop: $('stop'),
    newChat: $('new-chat'), messages: $('messages'), status: $('status'), quota: $('quota'),
    retry: $('retry'), form: $('composer'), token: $('token'), settings: $('settings'),
  };
  history = load(KEY.history, []);
  history = Array.isArray(history) ? history.filter(isTurn) : [];
  for (const m of history) addBubble(m.role, m.content);
  scrollDown();
  ui.token.value = load(KEY.token, '');
  setState('loading');

  ui.form.addEventListener('submit', (e) => {
    e.preventDefault(); // no navigation (and CSP's form-action 'none' would refuse it anyway)
    const text = ui.message.value.trim();
    if (!text || controller || models.length === 0) return;
    ui.message.value = '';
    send(text);
  });
  ui.message.addEventListener('keydown', (e) => {
    // Enter sends, Shift+Enter is a new line; never while an IME is composing a character.
    if (e.key === 'Enter' && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
      e.preventDefault();
      if (!ui.send.disabled) ui.form.requestSubmit();
    }
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && controller) controller.abort();
  });
  ui.stop.addEventListener('click', () => controller?.abort());
  ui.newChat.addEventListener('click', newChat);
  ui.retry.addEventListener('click', loadModels);
  ui.provider.addEventListener('change', () => {
    fillModels();
    rememberChoice();
  });
  ui.model.addEventListener('change', rememberChoice);
  ui.token.addEventListener('change', () => {
    save(KEY.token, ui.token.value.trim());
    loadModels();
  });
  window.addEventListener('online', () => models.length === 0 && loadModels());

  loadModels();
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('/sw.js', { scope: '/' }).catch(() => {
      // Plain http on a non-local host, or a private window: the page works, just not offline.
    });
  }
}

if (typeof document !== 'undefined') main();
