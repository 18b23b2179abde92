// Markdown for model answers, built from DOM nodes. Model text reaches the page only as Text nodes
// and textContent, never as HTML, so markup in an answer (<script>, <img onerror>) stays literal
// text; links are made only for http, https and mailto URLs, as the URL parser reads them.
//
// A chat-sized subset of CommonMark: fenced code (with a Copy button), ATX headings, paragraphs
// (every line break is kept, as chat apps do), blockquotes, ordered and unordered lists (nested by
// indentation), thematic breaks; inline code, **strong**, *emphasis*, ~~strike~~, backslash
// escapes, [links](url), <autolinks> and bare http(s) URLs. No raw HTML, no images, no tables.
//
// An answer is re-rendered as its deltas arrive: MarkdownView keeps the top-level blocks it built
// and rebuilds only those whose source changed (in practice the last one), so the cost per render
// is one parse of the text plus the block being written.

const MAX_DEPTH = 16; // nested quotes, lists and emphasis beyond this are text (bounded recursion)
const PUNCT = '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~';
const SAFE_PROTOCOLS = new Set(['http:', 'https:', 'mailto:']);

const FENCE = /^( {0,3})(`{3,}|~{3,})(.*)$/;
const FENCE_CLOSE = /^ {0,3}(`{3,}|~{3,})[ \t]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const HR = /^ {0,3}(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,})$/;
const QUOTE = /^ {0,3}>/;
const ITEM = /^( {0,3})([-+*]|\d{1,9}[.)])(?:([ \t]+)(.*))?$/;
const WORDY = /[\p{L}\p{N}]/u;
const SPACE = /\s/;

/** The URL as the browser would follow it, or null unless it is absolute http, https or mailto. */
export function safeUrl(raw) {
  let url;
  try {
    url = new URL(raw);
  } catch {
    return null; // relative or malformed: there is no base to resolve a model's URL against
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

// ---- blocks --------------------------------------------------------------------------------

const blank = (line) => /^[ \t]*$/.test(line);
const indentOf = (line) => line.length - line.trimStart().length;

function expandTabs(line) {
  if (!line.includes('\t')) return line;
  const lead = /^[ \t]*/.exec(line)[0];
  let col = 0;
  for (const c of lead) col = c === '\t' ? col + 4 - (col % 4) : col + 1;
  return ' '.repeat(col) + line.slice(lead.length);
}

function openFence(line) {
  const m = FENCE.exec(line);
  if (!m) return null;
  const ch = m[2][0];
  if (ch === '`' && m[3].includes('`')) return null; // `` ```a`b `` is inline code, not a fence
  return { indent: m[1].length, ch, len: m[2].length, lang: m[3].trim().split(/\s+/)[0] };
}

function closesFence(line, fence) {
  const m = FENCE_CLOSE.exec(line);
  return m !== null && m[1][0] === fence.ch && m[1].length >= fence.len;
}

// A list item that may interrupt a paragraph: a bullet or "1." with some text (CommonMark's rule).
function itemInterrupts(line) {
  const m = ITEM.exec(line);
  return m !== null && Boolean(m[4] && m[4].trim()) && (/^[-+*]$/.test(m[2]) || /^1[.)]$/.test(m[2]));
}

function interrupts(line) {
  return openFence(line) !== null || HEADING.test(line) || HR.test(line) || QUOTE.test(line) || itemInterrupts(line);
}

function sameList(m, ordered, mark) {
  return m !== null && /\d/.test(m[2]) === ordered && m[2].slice(-1) === mark;
}

function parseList(lines, i, depth) {
  const first = ITEM.exec(lines[i]);
  const ordered = /\d/.test(first[2]);
  const mark = first[2].slice(-1);
  const items = [];
  let loose = false;
  while (i < lines.length && !HR.test(lines[i])) {
    const m = ITEM.exec(lines[i]);
    if (!sameList(m, ordered, mark)) break;
    const spaces = m[3] ? m[3].length : 0;
    const content = m[4] ?? '';
    // Where the item's own blocks start: after the marker and its spaces (one if more than four).
    const ci = m[1].length + m[2].length + (content && spaces <= 4 ? spaces : 1);
    const body = [content];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      if (blank(line)) {
        let j = i;
        while (j < lines.length && blank(lines[j])) j += 1;
        if (j < lines.length && indentOf(lines[j]) >= ci) {
          for (; i < j; i += 1) body.push('');
          continue;
        }
        break;
      }
      if (indentOf(line) >= ci) body.push(line.slice(ci));
      else if (!interrupts(line) && !ITEM.test(line) && !blank(body[body.length - 1])) body.push(line.trim());
      else break; // a sibling, another block, or text that no longer belongs to the item
      i += 1;
    }
    while (body.length > 1 && blank(body[body.length - 1])) body.pop();
    if (body.some(blank)) loose = true;
    items.push(body);
    let j = i;
    while (j < lines.length && blank(lines[j])) j += 1;
    if (j > i && j < lines.length && sameList(ITEM.exec(lines[j]), ordered, mark) && !HR.test(lines[j])) {
      loose = true; // items separated by blank lines
      i = j;
    }
  }
  const block = {
    type: 'list',
    ordered,
    start: ordered ? parseInt(first[2], 10) : 1,
    tight: !loose,
    items: items.map((body) => parseBlocks(body, depth + 1, false)),
  };
  return { block, next: i };
}

function parseBlocks(lines, depth, top) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (blank(line)) {
      i += 1;
      continue;
    }
    const start = i;
    let block;
    let m;
    const fence = openFence(line);
    if (fence) {
      const body = [];
      for (i += 1; i < lines.length; i += 1) {
        if (closesFence(lines[i], fence)) {
          i += 1;
          break;
        }
        const l = lines[i];
        body.push(l.slice(Math.min(fence.indent, indentOf(l))));
      }
      block = { type: 'code', lang: fence.lang, text: body.join('\n') }; // unclosed: code to the end
    } else if ((m = HEADING.exec(line))) {
      block = { type: 'heading', level: m[1].length, text: m[2] ?? '' };
      i += 1;
    } else if (HR.test(line)) {
      block = { type: 'hr' };
      i += 1;
    } else if (QUOTE.test(line) && depth < MAX_DEPTH) {
      const inner = [];
      while (i < lines.length && !blank(lines[i])) {
        const l = lines[i];
        if (QUOTE.test(l)) inner.push(l.replace(/^ {0,3}> ?/, ''));
        else if (!interrupts(l)) inner.push(l); // a lazy continuation line
        else break;
        i += 1;
      }
      block = { type: 'quote', blocks: parseBlocks(inner, depth + 1, false) };
    } else if (ITEM.test(line) && depth < MAX_DEPTH) {
      const list = parseList(lines, i, depth);
      block = list.block;
      i = list.next;
    } else {
      const para = [line.trim()];
      for (i += 1; i < lines.length && !blank(lines[i]) && !interrupts(lines[i]); i += 1) para.push(lines[i].trim());
      block = { type: 'para', text: para.join('\n') };
    }
    if (top) block.key = lines.slice(start, i).join('\n');
    out.push(block);
  }
  return out;
}

/** The top-level blocks of `text`, each with `key`: its source lines. */
export function parse(text) {
  return parseBlocks(text.split(/\r\n|\r|\n/).map(expandTabs), 0, true);
}

// ---- inline --------------------------------------------------------------------------------

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function runLength(s, i, ch) {
  let j = i;
  while (s[j] === ch) j += 1;
  return j - i;
}

// Where a code span opened by `n` backticks before `from` closes: a run of exactly n, or -1.
function codeClose(s, from, n) {
  for (let j = s.indexOf('`', from); j >= 0; j = s.indexOf('`', j)) {
    const m = runLength(s, j, '`');
    if (m === n) return j;
    j += m;
  }
  return -1;
}

function unescape(s) {
  return s.replace(/\\(.)/g, (all, c) => (PUNCT.includes(c) ? c : all));
}

// `[text](destination "title")` at i: {text, dest, title, end} or null when it is not that syntax.
function parseLink(s, i) {
  let depth = 0;
  let j = i;
  for (; j < s.length; j += 1) {
    const c = s[j];
    if (c === '\\') j += 1;
    else if (c === '`') {
      const n = runLength(s, j, '`');
      const close = codeClose(s, j + n, n);
      j = (close >= 0 ? close + n : j + n) - 1;
    } else if (c === '[') depth += 1;
    else if (c === ']' && --depth === 0) break;
  }
  if (j >= s.length || s[j + 1] !== '(') return null;
  const text = s.slice(i + 1, j);
  let k = j + 2;
  while (s[k] === ' ') k += 1;
  let dest;
  if (s[k] === '<') {
    const e = s.indexOf('>', k);
    if (e < 0 || s.slice(k + 1, e).includes('\n')) return null;
    dest = s.slice(k + 1, e);
    k = e + 1;
  } else {
    const st = k;
    for (let parens = 0; k < s.length; k += 1) {
      const c = s[k];
      if (c === '\\') k += 1;
      else if (c === '(') parens += 1;
      else if (c === ')' && parens-- === 0) break;
      else if (SPACE.test(c)) break;
    }
    dest = s.slice(st, k);
  }
  while (s[k] === ' ') k += 1;
  let title = '';
  if (s[k] === '"' || s[k] === "'") {
    const e = s.indexOf(s[k], k + 1);
    if (e < 0) return null;
    title = s.slice(k + 1, e);
    for (k = e + 1; s[k] === ' '; ) k += 1;
  }
  if (s[k] !== ')') return null;
  return { text, dest: unescape(dest), title: unescape(title), end: k + 1 };
}

// Emphasis opened by the run of `ch` at i, CommonMark-like: an opener is followed by a non-space,
// a closer preceded by one; `_` never works inside a word (snake_case stays). A run of n uses up
// to three of its last delimiters (*** is strong + em); a longer closer leaves its extra ones
// inside. {lead, tags, inner, end} or null.
function parseEmphasis(s, i, ch) {
  const n = runLength(s, i, ch);
  const after = s[i + n];
  if (after === undefined || SPACE.test(after)) return null;
  if (ch === '_' && i > 0 && WORDY.test(s[i - 1])) return null;
  if (ch === '~' && n !== 2) return null;
  for (let use = ch === '~' ? 2 : Math.min(n, 3); use >= 1; use -= 1) {
    for (let j = i + n; j < s.length; ) {
      const c = s[j];
      if (c === '\\') {
        j += 2;
        continue;
      }
      if (c === '`') {
        const m = runLength(s, j, '`');
        const close = codeClose(s, j + m, m);
        j = close >= 0 ? close + m : j + m;
        continue;
      }
      if (c !== ch) {
        j += 1;
        continue;
      }
      const m = runLength(s, j, ch);
      const fits = use === 3 ? m >= 3 : use === 2 ? m >= 2 : m === 1 || m >= 3;
      const closes = !SPACE.test(s[j - 1]) && !(ch === '_' && WORDY.test(s[j + m] ?? ''));
      if (fits && closes && (ch !== '~' || m === 2)) {
        const inner = s.slice(i + n, j + m - use);
        if (inner) {
          const tags = ch === '~' ? ['del'] : use === 3 ? ['strong', 'em'] : use === 2 ? ['strong'] : ['em'];
          return { lead: s.slice(i, i + n - use), tags, inner, end: j + m };
        }
      }
      j += m;
    }
  }
  return null;
}

function link(href, title) {
  const a = el('a');
  a.href = href;
  if (title) a.title = title;
  a.target = '_blank';
  a.rel = 'noopener noreferrer';
  return a;
}

// A bare URL ends before whitespace or '<'; trailing punctuation is the sentence's, and a closing
// parenthesis too unless the URL opened one.
function bareUrlEnd(s, i) {
  let e = i;
  while (e < s.length && !SPACE.test(s[e]) && s[e] !== '<') e += 1;
  for (;;) {
    const last = s[e - 1];
    const url = s.slice(i, e);
    if ('.,:;!?\'"*_~'.includes(last)) e -= 1;
    else if (last === ')' && url.split(')').length > url.split('(').length) e -= 1;
    else return e;
  }
}

// Inside a link's text (inLink) no further links are made: an <a> never nests.
function inline(s, parent, depth, inLink = false) {
  let buf = '';
  const put = (node) => {
    if (buf) parent.append(buf);
    buf = '';
    parent.append(node);
  };
  let i = 0;
  while (i < s.length) {
    const c = s[i];
    if (c === '\\' && i + 1 < s.length && PUNCT.includes(s[i + 1])) {
      buf += s[i + 1];
      i += 2;
    } else if (c === '\n') {
      if (buf.endsWith('\\')) buf = buf.slice(0, -1); // a backslash hard break: the break is kept anyway
      put(el('br'));
      i += 1;
    } else if (c === '`') {
      const n = runLength(s, i, '`');
      const close = codeClose(s, i + n, n);
      if (close < 0) {
        buf += s.slice(i, i + n);
        i += n;
        continue;
      }
      let text = s.slice(i + n, close).replace(/\n/g, ' ');
      if (text.length > 2 && text[0] === ' ' && text[text.length - 1] === ' ' && text.trim()) text = text.slice(1, -1);
      const code = el('code');
      code.textContent = text;
      put(code);
      i = close + n;
    } else if ((c === '[' || (c === '!' && s[i + 1] === '[')) && depth < MAX_DEPTH && !inLink) {
      const at = c === '!' ? i + 1 : i; // an image is shown as a link to it: no remote images here
      const found = parseLink(s, at);
      if (!found) {
        buf += s.slice(i, at + 1);
        i = at + 1;
        continue;
      }
      const href = safeUrl(found.dest);
      if (href) {
        const a = link(href, found.title);
        inline(found.text || found.dest, a, depth + 1, true);
        put(a);
      } else {
        buf += s.slice(i, found.end); // javascript:, data:, relative...: the whole thing stays text
      }
      i = found.end;
    } else if (c === '<' && !inLink && /^<[a-zA-Z][a-zA-Z0-9+.-]{1,31}:[^\s<>]*>/.test(s.slice(i, i + 2048))) {
      const e = s.indexOf('>', i);
      const href = safeUrl(s.slice(i + 1, e));
      if (href) {
        const a = link(href, '');
        a.textContent = s.slice(i + 1, e);
        put(a);
      } else buf += s.slice(i, e + 1);
      i = e + 1;
    } else if (c === 'h' && !inLink && /^https?:\/\/[^\s<]/.test(s.slice(i, i + 9)) && !WORDY.test(s[i - 1] ?? '')) {
      const e = bareUrlEnd(s, i);
      const href = safeUrl(s.slice(i, e));
      if (href) {
        const a = link(href, '');
        a.textContent = s.slice(i, e);
        put(a);
      } else buf += s.slice(i, e);
      i = e;
    } else if ((c === '*' || c === '_' || c === '~') && depth < MAX_DEPTH) {
      const em = parseEmphasis(s, i, c);
      if (!em) {
        const n = runLength(s, i, c);
        buf += s.slice(i, i + n);
        i += n;
        continue;
      }
      buf += em.lead;
      const outer = el(em.tags[0]);
      let node = outer;
      for (const tag of em.tags.slice(1)) node = node.appendChild(el(tag));
      inline(em.inner, node, depth + 1, inLink);
      put(outer);
      i = em.end;
    } else {
      buf += c;
      i += 1;
    }
  }
  if (buf) parent.append(buf);
}

// ---- building and re-rendering -------------------------------------------------------------

function fallbackCopy(node) {
  // No async clipboard (plain http on a LAN address, or refused): select the code so that the
  // user can copy it, and try the old command on that selection.
  const range = document.createRange();
  range.selectNodeContents(node);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  try {
    return document.execCommand('copy');
  } catch {
    return false;
  }
}

async function copyCode(code, button) {
  let ok;
  try {
    await navigator.clipboard.writeText(code.textContent);
    ok = true;
  } catch {
    ok = fallbackCopy(code);
  }
  button.textContent = ok ? 'Copied' : 'Selected: press Ctrl+C';
  clearTimeout(button.resetTimer);
  button.resetTimer = setTimeout(() => (button.textContent = 'Copy'), 2000);
}

function codeBlock(block) {
  const box = el('div', 'code-block');
  const bar = el('div', 'code-bar');
  const lang = el('span', 'code-lang');
  lang.textContent = block.lang;
  const copy = el('button', 'copy');
  copy.type = 'button';
  copy.textContent = 'Copy';
  copy.setAttribute('aria-label', block.lang ? `Copy ${block.lang} code` : 'Copy code');
  const pre = el('pre');
  const code = el('code');
  if (/^[\w+#.-]{1,32}$/.test(block.lang)) code.className = `language-${block.lang}`;
  code.textContent = block.text;
  copy.addEventListener('click', () => copyCode(code, copy));
  bar.append(lang, copy);
  pre.append(code);
  box.append(bar, pre);
  return box;
}

function build(block) {
  switch (block.type) {
    case 'code':
      return codeBlock(block);
    case 'hr':
      return el('hr');
    case 'heading': {
      const h = el(`h${block.level}`);
      inline(block.text, h, 0);
      return h;
    }
    case 'quote': {
      const q = el('blockquote');
      q.append(...block.blocks.map(build));
      return q;
    }
    case 'list': {
      const list = el(block.ordered ? 'ol' : 'ul');
      if (block.ordered && block.start !== 1) list.start = block.start;
      for (const item of block.items) {
        const li = el('li');
        for (const b of item) {
          if (b.type === 'para' && block.tight) inline(b.text, li, 0);
          else li.append(build(b));
        }
        list.append(li);
      }
      return list;
    }
    default: {
      const p = el('p');
      inline(block.text, p, 0);
      return p;
    }
  }
}

/** Renders Markdown into `root` (which it owns), rebuilding only the blocks that changed. */
export class MarkdownView {
  constructor(root) {
    this.root = root;
    this.keys = [];
  }

  render(text) {
    const blocks = parse(text);
    const kids = this.root.children;
    blocks.forEach((block, i) => {
      if (this.keys[i] === block.key && kids[i]) return;
      const node = build(block);
      if (kids[i]) kids[i].replaceWith(node);
      else this.root.append(node);
    });
    while (kids.length > blocks.length) this.root.lastElementChild.remove();
    this.keys = blocks.map((b) => b.key);
  }
}
