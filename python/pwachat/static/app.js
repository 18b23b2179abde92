// pwachat reference client: one ES module (and markdown.js), no build step, no framework.
// The page runs under a strict CSP (no inline script or style), so every handler is wired here,
// and model output only ever reaches the DOM as text (Text nodes / textContent), never as HTML:
// answers are Markdown built from DOM nodes by markdown.js, questions stay plain text.
//
// An answer in progress survives a dropped connection and a reload: its stream id, the last event
// id rendered and the text so far are kept in localStorage (pwachat.pending), and the page picks
// the stream up again with GET /api/chat/stream/{id} and Last-Event-ID (the server keeps
// generating for STREAM_GRACE_S meanwhile). Stop asks the server to stop it.

import { MarkdownView } from './markdown.js';

const HISTORY_MAX = 50; // the contract's default MAX_HISTORY_MESSAGES: more is refused
const CONTENT_MAX = 4000; // the default MAX_MESSAGE_CHARS, which also bounds each history item
const STORE_MAX = 200; // kept on screen and in localStorage; only the last HISTORY_MAX are sent
const RETRY_MS = 10_000;
const RESUME_BACKOFF_MS = [250, 500, 1000, 2000, 4000, 5000]; // then 5 s until GIVE_UP_MS
// The default STREAM_GRACE_S (20) plus STREAM_RETAIN_S (120), and a margin: after that long the
// server has forgotten the stream and a resume can only answer 404.
const GIVE_UP_MS = 150_000;
const STOP_WAIT_MS = 3000; // after asking the server to stop, how long its `cancelled` done may take
const STALL_MS = 45_000; // no byte for this long (the server pings every 15 s): the connection is dead
const SAVE_MS = 250; // the pending answer is written at most this often (and when the page hides)
const KEY = {
  history: 'pwachat.history',
  choice: 'pwachat.choice',
  token: 'pwachat.token',
  pending: 'pwachat.pending', // the answer in flight: {question, label, id, last, text}
};

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
    // `retry` only steers EventSource reconnection; this page paces its own resumes.
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
let current = null; // the answer in flight (see newTurn), null when idle
let retryTimer = 0;
let leaving = false; // the page is being unloaded: what is in flight must not touch storage

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

function forget(key) {
  try {
    localStorage.removeItem(key);
  } catch {
    // Disabled storage holds nothing to forget.
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

// A wait as people say it: "45 s", "12 min", "3 h 12 min" (minutes rounded up).
export function humanDuration(seconds) {
  const s = Math.max(1, Math.ceil(seconds));
  if (s < 60) return `${s} s`;
  const minutes = Math.ceil(s / 60);
  if (minutes < 60) return `${minutes} min`;
  const h = Math.floor(minutes / 60);
  const m = minutes % 60;
  return m ? `${h} h ${m} min` : `${h} h`;
}

// A readable line for a non-2xx answer: the contract's envelope carries `error.message`.
async function errorText(res) {
  let message = '';
  let code = '';
  try {
    const error = (await res.json())?.error;
    message = typeof error?.message === 'string' ? error.message : '';
    code = typeof error?.code === 'string' ? error.code : '';
  } catch {
    // Not JSON (a proxy's HTML page, say): fall back to the status line.
  }
  const wait = retryAfter(res);
  if (res.status === 429 && code === 'budget_exceeded') return budgetRefusal(res, wait);
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

// The token budget (input + output tokens over a sliding day), beside the request quota. Shown
// only while the server has budgets on: its chat answers carry X-TokenBudget-*, and
// /api/rate-limit says `"tokens": null` when they are off.
const budget = { remaining: null, limit: null, spentUntil: 0, timer: 0 };

function showBudget(remaining, limit) {
  const n = Number.parseInt(remaining, 10);
  if (!Number.isFinite(n)) {
    budget.remaining = null;
    ui.budget.hidden = true;
    ui.budget.textContent = '';
    delete ui.budget.dataset.spent;
    return;
  }
  const max = Number.parseInt(limit, 10);
  budget.remaining = Math.max(0, n);
  budget.limit = Number.isFinite(max) ? max : null;
  paintBudget();
}

function paintBudget() {
  if (budget.remaining === null) return;
  const n = budget.remaining;
  const spent = n === 0 || Date.now() < budget.spentUntil;
  ui.budget.hidden = false;
  ui.budget.textContent = `${n.toLocaleString('en')} token${n === 1 ? '' : 's'} left today`;
  ui.budget.dataset.spent = String(spent);
  const of = budget.limit ? ` of ${budget.limit.toLocaleString('en')}` : '';
  ui.budget.title = spent
    ? `Today's token budget cannot cover another message (${n.toLocaleString('en')}${of} tokens left). ` +
      'Tokens used over the last 24 hours come back as they age.'
    : `Tokens (question, history and answer together) you can still use today${of}. ` +
      'While an answer is written its longest possible length is held back; what it leaves unused comes back.';
}

// A 429 budget_exceeded (the caller's budget, or the whole deployment's: its headers are the one
// that refused). Refused with nothing of it used means this message alone is more than the whole
// budget, and waiting will not help; otherwise Retry-After says when enough of it has come back.
function budgetRefusal(res, wait) {
  const limit = Number.parseInt(res.headers.get('X-TokenBudget-Limit'), 10);
  const left = Number.parseInt(res.headers.get('X-TokenBudget-Remaining'), 10);
  budgetSpent(wait);
  if (Number.isFinite(limit) && Number.isFinite(left) && left >= limit) {
    const whole = `${limit.toLocaleString('en')} token${limit === 1 ? '' : 's'}`;
    return `This message needs more tokens than the whole daily token budget (${whole}). ` +
      'Start a new chat or send a shorter message.';
  }
  return `Today's token budget is used up. ${wait ? `Try again in ${humanDuration(wait)}.` : 'Try again later.'}`;
}

// The display says "spent" until Retry-After has passed or a message is admitted.
function budgetSpent(wait) {
  const ms = (wait ?? 60) * 1000;
  budget.spentUntil = Date.now() + ms;
  clearTimeout(budget.timer);
  budget.timer = setTimeout(paintBudget, Math.min(ms + 50, 2 ** 31 - 1));
  paintBudget();
}

function quotaFromHeaders(res) {
  const h = (name) => res.headers.get(name);
  showQuota(h('X-RateLimit-Remaining'), h('X-RateLimit-Limit'), h('X-RateLimit-Reset'));
  // Absent on answers refused before the budget is looked at (400, 401, the request rate limit):
  // those leave the display as it was; /api/rate-limit, read after every answer, has the last word.
  if (h('X-TokenBudget-Remaining') === null) return;
  if (res.ok) budget.spentUntil = 0; // admitted: the budget covered this message
  showBudget(h('X-TokenBudget-Remaining'), h('X-TokenBudget-Limit'));
}

// GET /api/rate-limit is not itself limited, so the quota can show before the first message.
async function refreshQuota() {
  try {
    const res = await fetch('/api/rate-limit', { headers: authHeaders(), cache: 'no-store' });
    if (!res.ok) return;
    const { limits = {}, remaining = {}, reset_s: reset = {}, tokens = null } = await res.json();
    const tightest = Object.keys(remaining).sort((a, b) => remaining[a] - remaining[b])[0];
    if (tightest) showQuota(remaining[tightest], limits[tightest], reset[tightest]);
    showBudget(tokens?.remaining, tokens?.limit); // null: budgets are off, the display goes
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
  if (!current) setState('ready');
  refreshQuota();
}

function unavailable(text, retry = true) {
  models = [];
  fillPickers();
  setStatus(text, 'offline');
  ui.retry.hidden = false;
  if (!current) setState('unavailable');
  if (retry) retryTimer = setTimeout(loadModels, RETRY_MS);
}

// ---- conversation ----------------------------------------------------------------------------

function addBubble(role, text, label) {
  const el = document.createElement('div');
  el.className = `message ${role}`;
  el.dataset.label = label ?? (role === 'user' ? 'You' : 'Assistant');
  if (role === 'assistant') {
    const body = document.createElement('div');
    body.className = 'md';
    el.append(body);
    el.view = new MarkdownView(body);
    el.view.render(text);
  } else {
    el.append(document.createTextNode(text)); // a question is shown as typed: text, never HTML
  }
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

// One answer in flight. `id` is the stream's (from its `start` event), `last` the id of the last
// event rendered and `text` what those events said: the three are saved together, so that a
// resume asks for exactly what follows what is on screen.
function newTurn(question, label) {
  return {
    question, label, id: null, last: -1, text: '',
    finish: null, failure: null, stopping: false, detached: false,
    controller: null, wake: null, progress: false, seen: 0, saveTimer: 0, stopTimer: 0, frame: 0,
    userEl: addBubble('user', question), botEl: addBubble('assistant', '', label),
  };
}

function persist(turn) {
  clearTimeout(turn.saveTimer);
  turn.saveTimer = 0;
  if (turn.detached || leaving) return;
  const { question, label, id, last, text } = turn;
  save(KEY.pending, { question, label, id, last, text });
}

function persistSoon(turn) {
  if (!turn.saveTimer) turn.saveTimer = setTimeout(() => persist(turn), SAVE_MS);
}

function paint(turn) {
  cancelAnimationFrame(turn.frame);
  turn.frame = 0;
  if (turn.detached) return;
  const stick = nearBottom(); // follow the answer unless the reader scrolled up
  turn.botEl.view.render(turn.text);
  if (stick) scrollDown();
}

// Deltas come faster than frames: render at most once per frame (a parse of the whole answer,
// but only the block being written is rebuilt).
function paintSoon(turn) {
  if (!turn.frame) turn.frame = requestAnimationFrame(() => paint(turn));
}

function onEvent(turn, { type, data, lastEventId }) {
  const id = /^\d+$/.test(lastEventId) ? Number(lastEventId) : null;
  if (id !== null && id <= turn.last) return; // replayed by a resume: already on screen
  let payload;
  try {
    payload = JSON.parse(data);
  } catch {
    return; // not ours to interpret
  }
  if (type === 'start') {
    if (typeof payload.id === 'string') turn.id = payload.id;
    turn.label = `${providerLabel(payload.provider)} · ${payload.model}`;
    turn.botEl.dataset.label = turn.label;
    if (turn.stopping) requestStop(turn); // Stop was pressed before the stream had an id
  } else if (type === 'delta' && typeof payload.content === 'string' && payload.content) {
    turn.text += payload.content;
    paintSoon(turn);
  } else if (type === 'done') turn.finish = payload.finish_reason || 'stop';
  else if (type === 'error') turn.failure = payload.error?.message || 'The provider failed mid-answer.';
  if (id !== null) turn.last = id;
  turn.progress = true;
  if (type === 'start') persist(turn);
  else persistSoon(turn);
}

// Reads one connection's events until a terminal one, the end of the body, or a failure (thrown).
async function readStream(turn, res, controller) {
  const parser = new SSEParser((event) => onEvent(turn, event));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  turn.seen = Date.now();
  const watchdog = setInterval(() => Date.now() - turn.seen > STALL_MS && controller.abort(), 5000);
  try {
    while (!turn.finish && !turn.failure) {
      const { value, done } = await reader.read();
      if (done) break;
      turn.seen = Date.now();
      parser.feed(decoder.decode(value, { stream: true })); // an event cut by a drop is asked for again
    }
  } finally {
    clearInterval(watchdog);
    reader.cancel().catch(() => {}); // after a terminal event the rest is only the close
  }
}

// Resolves after `ms`, or at once when the network comes back or the user stops.
function pause(turn, ms) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      turn.wake = null;
      resolve();
    }
    turn.wake = done;
  });
}

class Retryable extends Error {}

// The POST (`body`), then as many resumes as it takes: until a terminal event, a refusal, a 404,
// the user's stop, or GIVE_UP_MS without getting through.
async function run(turn, body) {
  let lostAt = 0;
  let attempt = 0;
  for (;;) {
    const controller = (turn.controller = new AbortController());
    turn.progress = false;
    let res = null;
    try {
      if (body !== null) {
        res = await fetch('/api/chat/stream', {
          method: 'POST',
          headers: authHeaders({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
          body,
          signal: controller.signal,
          cache: 'no-store',
        });
        quotaFromHeaders(res);
      } else {
        res = await fetch(`/api/chat/stream/${encodeURIComponent(turn.id)}`, {
          headers: authHeaders({ Accept: 'text/event-stream', 'Last-Event-ID': String(turn.last) }),
          signal: controller.signal,
          cache: 'no-store',
        });
      }
      if (body === null && res.status === 204) {
        turn.finish = 'stop'; // the stream had ended and every event of it is on screen
        break;
      }
      if (!res.ok || !res.body) {
        if (body === null && res.status === 404) {
          turn.failure = 'The answer could not be resumed: the server no longer has it. What arrived is kept.';
        } else if (body === null && (res.status === 429 || res.status >= 500)) {
          throw new Retryable(); // too many readers for now, or a server restarting: try again
        } else turn.failure = await errorText(res);
        break;
      }
      if (body === null && !turn.stopping) setStatus(''); // resumed: the reconnecting note goes
      await readStream(turn, res, controller);
      if (turn.finish || turn.failure) break;
      // The body ended without a terminal event: a proxy or the server let go. Resume.
    } catch (err) {
      if (turn.stopping || turn.detached) break; // our own abort: Stop's wait ran out, or New chat
      if (body !== null && !res && !(err instanceof Retryable)) {
        // Nothing was committed, so there is nothing to resume.
        turn.failure = 'The backend is unreachable. Check your connection and try again.';
        loadModels(); // re-probe: disables Send and retries if the backend is really gone
        break;
      }
    }
    if (turn.stopping || turn.detached || leaving) break;
    if (turn.id === null) {
      turn.failure = 'The connection to the backend was lost.';
      break;
    }
    body = null;
    if (!lostAt || turn.progress) {
      lostAt = Date.now(); // that connection got somewhere: a fresh start for the backoff
      attempt = 0;
    }
    if (Date.now() - lostAt > GIVE_UP_MS) {
      turn.failure = 'The answer could not be resumed: the connection stayed down too long. What arrived is kept.';
      break;
    }
    const note = navigator.onLine
      ? 'Connection lost — resuming the answer…'
      : 'Offline — the answer will resume when the connection is back.';
    setStatus(note, 'reconnecting');
    await pause(turn, RESUME_BACKOFF_MS[Math.min(attempt, RESUME_BACKOFF_MS.length - 1)]);
    attempt += 1;
    if (turn.stopping || turn.detached) break;
  }
  end(turn);
}

function requestStop(turn) {
  fetch(`/api/chat/stream/${encodeURIComponent(turn.id)}/stop`, {
    method: 'POST',
    headers: authHeaders({ 'Content-Type': 'application/json' }),
    body: '{}',
    cache: 'no-store',
  })
    .then((res) => res.json()) // {"stopped": false} when it had ended: its terminal event is coming
    .catch(() => {}); // unreachable or refused: the local abort in stopTurn ends it anyway
}

// Ask the server to stop (every reader then gets `done` with `cancelled`); if that does not come
// within STOP_WAIT_MS, let go locally.
function stopTurn(turn) {
  if (turn.stopping) return;
  turn.stopping = true;
  if (turn.id !== null) requestStop(turn); // else onEvent asks once `start` gives the id
  turn.stopTimer = setTimeout(() => turn.controller?.abort(), STOP_WAIT_MS);
  turn.wake?.();
}

function stop() {
  if (!current) return;
  if (!current.stopping) setStatus('Stopping…');
  stopTurn(current);
}

function end(turn) {
  clearTimeout(turn.stopTimer);
  if (leaving) return; // the next page resumes from what was saved
  refreshQuota(); // the part of the token reservation the answer did not use has come back
  clearTimeout(turn.saveTimer);
  if (turn.detached) {
    cancelAnimationFrame(turn.frame);
    return; // New chat took the screen and the storage
  }
  forget(KEY.pending);
  current = null;
  paint(turn);
  const { question, text: answer, finish, failure, botEl, userEl } = turn;
  botEl.removeAttribute('aria-busy');
  botEl.dataset.finish = finish ?? (failure ? 'error' : 'none');
  setState(models.length ? 'ready' : 'unavailable');

  const complete = finish !== null && finish !== 'cancelled';
  const stopped = !failure && !complete && turn.stopping;
  if (answer) {
    keep({ role: 'user', content: question }, { role: 'assistant', content: answer });
    if (!complete) botEl.classList.add('partial'); // what arrived is kept, marked as cut off
  } else if (complete) {
    keep({ role: 'user', content: question }); // an empty answer is not history
    botEl.remove();
  } else {
    // Nothing came back: the question was not answered, so it is not history. Offer it again.
    botEl.remove();
    userEl.classList.add('failed');
    if (!ui.message.value) ui.message.value = question;
  }
  if (failure) setStatus(failure, 'error');
  else if (stopped) setStatus('Stopped.');
  else if (finish === 'cancelled') setStatus('The answer was stopped before it was complete.');
  else if (finish === 'length') setStatus('The answer was cut short at the token limit.');
  else if (finish === 'content_filter') setStatus('The provider stopped the answer (content filter).');
  else if (!answer) setStatus('The model returned an empty answer.');
  else setStatus('');
  if (document.activeElement === document.body || document.activeElement === ui.stop) ui.message.focus();
}

function begin(turn, body) {
  current = turn;
  turn.botEl.setAttribute('aria-busy', 'true'); // screen readers announce the answer once it is complete
  scrollDown();
  setState('streaming');
  run(turn, body);
}

function send(text) {
  const provider = ui.provider.value;
  const model = ui.model.value;
  const body = JSON.stringify({ message: text, provider, model, history: outgoingHistory() });
  const turn = newTurn(text, `${providerLabel(provider)} · ${model}`);
  persist(turn); // a reload before `start` can at least offer the question again
  setStatus('');
  begin(turn, body);
}

// After a reload: the answer that was in flight, shown as far as it got, then resumed.
function resumePending() {
  const saved = load(KEY.pending, null);
  if (!saved || typeof saved.question !== 'string') return;
  if (typeof saved.id !== 'string' || !Number.isInteger(saved.last) || typeof saved.text !== 'string') {
    forget(KEY.pending);
    addBubble('user', saved.question).classList.add('failed');
    if (!ui.message.value) ui.message.value = saved.question;
    setStatus('The page was reloaded before the answer started: send it again.');
    return;
  }
  const turn = newTurn(saved.question, typeof saved.label === 'string' ? saved.label : undefined);
  Object.assign(turn, { id: saved.id, last: saved.last, text: saved.text, label: turn.botEl.dataset.label });
  paint(turn);
  setStatus('Resuming the answer…');
  begin(turn, null);
}

function newChat() {
  if (current) {
    // The answer is stopped on the server too, out of sight: nothing of it reaches the new chat.
    const turn = current;
    turn.detached = true;
    current = null;
    stopTurn(turn);
    setState(models.length ? 'ready' : 'unavailable');
  }
  forget(KEY.pending);
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
    budget: $('budget'), retry: $('retry'), form: $('composer'), token: $('token'), settings: $('settings'),
  };
  history = load(KEY.history, []);
  history = Array.isArray(history) ? history.filter(isTurn) : [];
  for (const m of history) addBubble(m.role, m.content);
  ui.token.value = load(KEY.token, '');
  setState('loading');
  resumePending();
  scrollDown();

  ui.form.addEventListener('submit', (e) => {
    e.preventDefault(); // no navigation (and CSP's form-action 'none' would refuse it anyway)
    const text = ui.message.value.trim();
    if (!text || current || models.length === 0) return;
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
    if (e.key === 'Escape' && current) stop();
  });
  ui.stop.addEventListener('click', stop);
  ui.newChat.addEventListener('click', newChat);
  ui.retry.addEventListener('click', loadModels);
  ui.provider.addEventListener('change', () => {
    fillModels();
    rememberChoice();
  });
  ui.model.addEventListener('change', rememberChoice);
  ui.token.addEventListener('change', () => {
    save(KEY.token, ui.token.value.trim());
    budget.spentUntil = 0; // another token is another caller, with a budget of its own
    loadModels();
  });
  // A phone that loses its network may keep a dead connection open for minutes: let go of it at
  // once, and resume as soon as the network is back (or on the backoff, as onLine can be wrong).
  window.addEventListener('offline', () => current?.id && current.controller?.abort());
  window.addEventListener('online', () => {
    current?.wake?.();
    if (models.length === 0) loadModels();
  });
  // Unloading aborts the stream; the next page resumes it from what is saved here.
  window.addEventListener('pagehide', () => {
    if (current) persist(current);
    leaving = true;
  });
  window.addEventListener('pageshow', (e) => {
    if (!e.persisted) return;
    leaving = false; // back from the back-forward cache: pick the answer up again
    current?.wake?.();
  });

  loadModels();
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('/sw.js', { scope: '/' }).catch(() => {
      // Plain http on a non-local host, or a private window: the page works, just not offline.
    });
  }
}

if (typeof document !== 'undefined') main();
