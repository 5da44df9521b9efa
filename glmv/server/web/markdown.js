/*
 * glmv web page: a small Markdown renderer that is its own sanitiser.
 *
 * Model output is untrusted. This renderer never parses HTML and never assigns innerHTML: it
 * parses Markdown into blocks and inline spans and builds DOM nodes with createElement and text
 * nodes. Only the elements in ALLOWED_TAGS are ever created and only these attributes are ever
 * set: `href` (http, https and mailto URLs only), `title`, `class` (fixed names, or
 * `language-<letters>`), `rel`, `target`, `start` and `style.textAlign` on table cells. Raw HTML
 * in the input (`<script>`, `<img onerror=...>`) is therefore shown as the text it is.
 *
 * Supported: paragraphs (single newlines become line breaks), ATX headings, fenced code blocks
 * (an unclosed fence while an answer streams runs to the end), indented lists (ordered,
 * unordered, nested, task boxes shown as text), block quotes, GFM tables with alignment,
 * thematic breaks, emphasis, strong, strikethrough, inline code, links, autolinks and bare URLs.
 * Images in Markdown are shown as links (the page never loads remote images a model names).
 *
 * API: GlmvMarkdown.render(text) -> DocumentFragment; GlmvMarkdown.safeUrl(url) -> string|null.
 */
'use strict';

(function (global) {
  const ALLOWED_TAGS = new Set([
    'p', 'br', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'pre', 'code', 'ul', 'ol', 'li', 'blockquote',
    'table', 'thead', 'tbody', 'tr', 'th', 'td', 'hr', 'em', 'strong', 'del', 'a', 'div', 'span',
    'button',
  ]);
  const MAX_DEPTH = 12;

  function el(tag, className) {
    if (!ALLOWED_TAGS.has(tag)) throw new Error('markdown: tag not allowed: ' + tag);
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function safeUrl(raw) {
    const url = String(raw || '').trim();
    if (!url || url.length > 4096) return null;
    // Control characters and whitespace are never part of a link we emit.
    if (/[\u0000-\u0020\u007f]/.test(url)) return null;
    const m = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(url);
    if (!m) return null;
    const scheme = m[1].toLowerCase();
    if (scheme !== 'http' && scheme !== 'https' && scheme !== 'mailto') return null;
    return url;
  }

  function link(url, children, title) {
    const a = el('a');
    a.href = url;
    a.rel = 'noopener noreferrer nofollow';
    a.target = '_blank';
    if (title) a.title = title;
    for (const child of children) a.appendChild(child);
    return a;
  }

  // --- inline ---------------------------------------------------------------------------------

  const PUNCT = /[!-/:-@[-`{-~]/;
  const WORD = /[\p{L}\p{N}]/u;
  const SPACE = /\s/;

  function findClosing(src, from, delim) {
    // The next `delim` that closes an emphasis: not preceded by whitespace, not escaped, and
    // (for single-character delimiters) not part of a longer run.
    let i = from;
    while (i < src.length) {
      const j = src.indexOf(delim, i);
      if (j < 0) return -1;
      if (src[j - 1] === '\\') { i = j + 1; continue; }
      let runEnd = j;
      while (src[runEnd] === delim[0]) runEnd++;
      // Never close in the middle of a run of the same character (`***x` has no closer).
      if (j > 0 && src[j - 1] === delim[0]) { i = runEnd; continue; }
      if (j === from || SPACE.test(src[j - 1])) { i = j + 1; continue; }
      const run = runEnd - j;
      if (run !== delim.length && !(run > delim.length && delim.length >= 2)) { i = runEnd; continue; }
      if (delim[0] === '_' && WORD.test(src[j + delim.length] || '')) { i = runEnd; continue; }
      return j;
    }
    return -1;
  }

  function findBracket(src, start) {
    // `src[start]` is '['; the index of its matching ']' (nesting, escapes, code spans), or -1.
    let depth = 0;
    for (let i = start; i < src.length; i++) {
      const c = src[i];
      if (c === '\\') { i++; continue; }
      if (c === '`') {
        const close = src.indexOf('`', i + 1);
        if (close > 0) i = close;
        continue;
      }
      if (c === '[') depth++;
      else if (c === ']') { depth--; if (depth === 0) return i; }
    }
    return -1;
  }

  function parseLinkTarget(src, start) {
    // `src[start]` is '('; returns {url, title, end} with end just past ')', or null.
    let i = start + 1;
    while (src[i] === ' ') i++;
    let url = '';
    if (src[i] === '<') {
      const close = src.indexOf('>', i);
      if (close < 0) return null;
      url = src.slice(i + 1, close);
      i = close + 1;
    } else {
      let depth = 0;
      const begin = i;
      for (; i < src.length; i++) {
        const c = src[i];
        if (c === '\\') { i++; continue; }
        if (c === '(') depth++;
        else if (c === ')') { if (depth === 0) break; depth--; }
        else if (c === ' ' || c === '\n') break;
      }
      url = src.slice(begin, i);
    }
    while (src[i] === ' ') i++;
    let title = '';
    if (src[i] === '"' || src[i] === "'") {
      const q = src[i];
      const close = src.indexOf(q, i + 1);
      if (close < 0) return null;
      title = src.slice(i + 1, close);
      i = close + 1;
      while (src[i] === ' ') i++;
    }
    if (src[i] !== ')') return null;
    return { url: url.replace(/\\([!-/:-@[-`{-~])/g, '$1'), title, end: i + 1 };
  }

  const BARE_URL = /^(https?:\/\/[^\s<>"'`]+)/i;

  function trimUrl(url) {
    // Leave trailing punctuation (and unbalanced closing parentheses) outside the link.
    let out = url;
    for (;;) {
      const last = out[out.length - 1];
      if (/[.,;:!?*_~'"，。；：！？、）》」』]/.test(last)) { out = out.slice(0, -1); continue; }
      if (last === ')') {
        const opens = (out.match(/\(/g) || []).length;
        const closes = (out.match(/\)/g) || []).length;
        if (closes > opens) { out = out.slice(0, -1); continue; }
      }
      return out;
    }
  }

  function parseInline(src, depth) {
    const out = [];
    let text = '';
    const flush = () => {
      if (text) { out.push(document.createTextNode(text)); text = ''; }
    };
    if (depth > MAX_DEPTH) return [document.createTextNode(src)];
    // A delimiter with no closer after some position has none after any later one either:
    // remembering that keeps long unbalanced input (`**a **b **c ...`) linear.
    const noCloser = new Set();
    const closing = (from, delim) => {
      if (noCloser.has(delim)) return -1;
      const j = findClosing(src, from, delim);
      if (j < 0) noCloser.add(delim);
      return j;
    };
    let i = 0;
    while (i < src.length) {
      const c = src[i];
      if (c === '\\') {
        const next = src[i + 1];
        if (next === '\n') { flush(); out.push(el('br')); i += 2; continue; }
        if (next !== undefined && PUNCT.test(next)) { text += next; i += 2; continue; }
        text += c; i++; continue;
      }
      if (c === '\n') {
        text = text.replace(/ +$/, '');
        flush(); out.push(el('br')); i++;
        while (src[i] === ' ') i++;
        continue;
      }
      if (c === '`') {
        let n = 0;
        while (src[i + n] === '`') n++;
        const fence = '`'.repeat(n);
        let search = i + n;
        let close = -1;
        while (search < src.length) {
          const j = src.indexOf(fence, search);
          if (j < 0) break;
          let m = 0;
          while (src[j + m] === '`') m++;
          if (m === n) { close = j; break; }
          search = j + m;
        }
        if (close < 0) { text += fence; i += n; continue; }
        let body = src.slice(i + n, close).replace(/\n/g, ' ');
        if (body.length > 2 && body[0] === ' ' && body[body.length - 1] === ' ' && body.trim()) body = body.slice(1, -1);
        flush();
        const code = el('code');
        code.textContent = body;
        out.push(code);
        i = close + n;
        continue;
      }
      if (c === '*' || c === '_' || c === '~') {
        let n = 0;
        while (src[i + n] === c) n++;
        const after = src[i + n];
        const before = i > 0 ? src[i - 1] : '';
        const opens = after !== undefined && !SPACE.test(after) && !(c === '_' && WORD.test(before));
        if (c === '~') {
          if (n === 2 && opens) {
            const close = closing(i + 2, '~~');
            if (close > i + 2) {
              flush();
              const del = el('del');
              for (const child of parseInline(src.slice(i + 2, close), depth + 1)) del.appendChild(child);
              out.push(del);
              i = close + 2;
              continue;
            }
          }
          text += src.slice(i, i + n); i += n; continue;
        }
        if (opens) {
          const tries = n >= 3 ? [3, 2, 1] : n === 2 ? [2, 1] : [1];
          let done = false;
          for (const len of tries) {
            const delim = c.repeat(len);
            const close = closing(i + len, delim);
            if (close > i + len) {
              flush();
              const inner = parseInline(src.slice(i + len, close), depth + 1);
              let node;
              if (len === 3) {
                node = el('strong');
                const em = el('em');
                for (const child of inner) em.appendChild(child);
                node.appendChild(em);
              } else {
                node = el(len === 2 ? 'strong' : 'em');
                for (const child of inner) node.appendChild(child);
              }
              if (n > len) text += c.repeat(n - len);
              flush();
              out.push(node);
              i = close + len;
              done = true;
              break;
            }
          }
          if (done) continue;
        }
        text += src.slice(i, i + n); i += n; continue;
      }
      if (c === '!' && src[i + 1] === '[') {
        const close = findBracket(src, i + 1);
        if (close > 0 && src[close + 1] === '(') {
          const target = parseLinkTarget(src, close + 1);
          if (target) {
            const alt = src.slice(i + 2, close);
            const url = safeUrl(target.url);
            flush();
            const label = document.createTextNode('[' + (alt || 'image') + ']');
            out.push(url ? link(url, [label], target.title) : label);
            i = target.end;
            continue;
          }
        }
        text += c; i++; continue;
      }
      if (c === '[') {
        const close = findBracket(src, i);
        if (close > 0 && src[close + 1] === '(') {
          const target = parseLinkTarget(src, close + 1);
          if (target) {
            const inner = parseInline(src.slice(i + 1, close), depth + 1);
            const url = safeUrl(target.url);
            flush();
            if (url) out.push(link(url, inner, target.title));
            else for (const child of inner) out.push(child);
            i = target.end;
            continue;
          }
        }
        text += c; i++; continue;
      }
      if (c === '<') {
        const m = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(src.slice(i, i + 4100));
        if (m && safeUrl(m[1])) {
          flush();
          out.push(link(m[1], [document.createTextNode(m[1])]));
          i += m[0].length;
          continue;
        }
        text += c; i++; continue;
      }
      if ((c === 'h' || c === 'H') && !WORD.test(i > 0 ? src[i - 1] : '')) {
        const m = BARE_URL.exec(src.slice(i, i + 4100));
        if (m) {
          const url = trimUrl(m[1]);
          if (url.length > 8 && safeUrl(url)) {
            flush();
            out.push(link(url, [document.createTextNode(url)]));
            i += url.length;
            continue;
          }
        }
      }
      text += c;
      i++;
    }
    flush();
    return out;
  }

  function appendInline(node, src, depth) {
    for (const child of parseInline(src, depth)) node.appendChild(child);
    return node;
  }

  // --- blocks ---------------------------------------------------------------------------------

  const FENCE = /^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  const HR = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*)|$)/;
  const TABLE_DELIM = /^ *\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;

  function isBlank(line) { return /^\s*$/.test(line); }

  function expandTabs(line) {
    return line.indexOf('\t') < 0 ? line : line.replace(/^\t+/, (m) => '    '.repeat(m.length));
  }

  function splitRow(line) {
    let s = line.trim();
    if (s.startsWith('|')) s = s.slice(1);
    if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
    const cells = [];
    let cur = '';
    let inCode = false;
    for (let i = 0; i < s.length; i++) {
      const c = s[i];
      if (c === '\\' && s[i + 1] === '|') { cur += '|'; i++; continue; }
      if (c === '`') inCode = !inCode;
      if (c === '|' && !inCode) { cells.push(cur.trim()); cur = ''; continue; }
      cur += c;
    }
    cells.push(cur.trim());
    return cells;
  }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || HR.test(line) || QUOTE.test(line) ||
      LIST_ITEM.test(line) || (line.includes('|') && next !== undefined && TABLE_DELIM.test(next) && next.includes('-'));
  }

  function codeBlock(lines, lang, closed) {
    const wrap = el('div', 'code-block');
    const bar = el('div', 'code-bar');
    const label = el('span', 'code-lang');
    label.textContent = lang || 'text';
    const copy = el('button', 'code-copy');
    copy.type = 'button';
    copy.dataset.copy = 'code';
    bar.appendChild(label);
    bar.appendChild(copy);
    const pre = el('pre');
    const code = el('code', lang ? 'language-' + lang.replace(/[^A-Za-z0-9_+#-]/g, '').slice(0, 32) : '');
    code.textContent = lines.join('\n');
    pre.appendChild(code);
    wrap.appendChild(bar);
    wrap.appendChild(pre);
    if (!closed) wrap.classList.add('open-fence');
    return wrap;
  }

  function table(header, aligns, rows, depth) {
    const wrap = el('div', 'table-wrap');
    const t = el('table');
    const thead = el('thead');
    const tr = el('tr');
    header.forEach((cell, k) => {
      const th = appendInline(el('th'), cell, depth + 1);
      if (aligns[k]) th.style.textAlign = aligns[k];
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    t.appendChild(thead);
    const tbody = el('tbody');
    for (const row of rows) {
      const r = el('tr');
      for (let k = 0; k < header.length; k++) {
        const td = appendInline(el('td'), row[k] || '', depth + 1);
        if (aligns[k]) td.style.textAlign = aligns[k];
        r.appendChild(td);
      }
      tbody.appendChild(r);
    }
    t.appendChild(tbody);
    wrap.appendChild(t);
    return wrap;
  }

  function parseList(lines, start, depth) {
    // Items of one list: same marker kind, same indentation; continuation lines are indented.
    const first = LIST_ITEM.exec(lines[start]);
    const baseIndent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const bullet = first[2].slice(-1);
    const list = el(ordered ? 'ol' : 'ul');
    if (ordered) {
      const n = parseInt(first[2], 10);
      if (n !== 1) list.start = n;
    }
    const items = [];
    let i = start;
    let loose = false;
    while (i < lines.length) {
      const m = LIST_ITEM.exec(lines[i]);
      if (!m || m[1].length !== baseIndent || /\d/.test(m[2]) !== ordered || m[2].slice(-1) !== bullet) break;
      const contentIndent = baseIndent + m[2].length + Math.min((m[3] || ' ').length, 4);
      const body = [m[4] || ''];
      i++;
      let sawBlank = false;
      while (i < lines.length) {
        const line = lines[i];
        if (isBlank(line)) { sawBlank = true; body.push(''); i++; continue; }
        const indent = line.length - line.replace(/^ +/, '').length;
        if (indent >= contentIndent || (indent > baseIndent && !sawBlank)) {
          body.push(line.slice(Math.min(indent, contentIndent)));
          sawBlank = false;
          i++;
          continue;
        }
        if (!sawBlank && !startsBlock(line, lines[i + 1]) && indent <= baseIndent) {
          // A lazy continuation of the item's paragraph.
          body.push(line.trim());
          i++;
          continue;
        }
        break;
      }
      while (body.length && isBlank(body[body.length - 1])) { body.pop(); if (i < lines.length && LIST_ITEM.test(lines[i])) loose = true; }
      items.push(body);
      if (sawBlank && i < lines.length && !LIST_ITEM.test(lines[i])) break;
    }
    for (const body of items) {
      const li = el('li');
      const frag = parseBlocks(body, depth + 1);
      const kids = Array.from(frag.childNodes);
      if (!loose && kids.length >= 1 && kids[0].nodeName === 'P') {
        // Tight list: the first paragraph's content sits directly in the item.
        const p = kids[0];
        while (p.firstChild) li.appendChild(p.firstChild);
        for (const kid of kids.slice(1)) li.appendChild(kid);
      } else {
        li.appendChild(frag);
      }
      list.appendChild(li);
    }
    return { node: list, end: i };
  }

  function parseBlocks(lines, depth) {
    const frag = document.createDocumentFragment();
    if (depth > MAX_DEPTH) {
      const p = el('p');
      p.textContent = lines.join('\n');
      frag.appendChild(p);
      return frag;
    }
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (isBlank(line)) { i++; continue; }
      let m = FENCE.exec(line);
      if (m) {
        const indent = m[1].length;
        const fence = m[2];
        const body = [];
        let closed = false;
        i++;
        while (i < lines.length) {
          const l = lines[i];
          const trimmed = l.trim();
          if (trimmed.startsWith(fence[0].repeat(fence.length)) && /^([`~])\1*$/.test(trimmed) && trimmed[0] === fence[0]) {
            closed = true; i++; break;
          }
          body.push(indent ? l.replace(new RegExp('^ {0,' + indent + '}'), '') : l);
          i++;
        }
        frag.appendChild(codeBlock(body, m[3], closed));
        continue;
      }
      m = HEADING.exec(line);
      if (m) {
        frag.appendChild(appendInline(el('h' + m[1].length), m[2] || '', depth));
        i++;
        continue;
      }
      if (HR.test(line)) { frag.appendChild(el('hr')); i++; continue; }
      if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && !isBlank(lines[i])) {
          const q = QUOTE.exec(lines[i]);
          body.push(q ? q[1] : lines[i]);
          i++;
        }
        const bq = el('blockquote');
        bq.appendChild(parseBlocks(body, depth + 1));
        frag.appendChild(bq);
        continue;
      }
      if (LIST_ITEM.test(line) && (LIST_ITEM.exec(line)[4] !== undefined || isBlank(lines[i + 1] || ''))) {
        const { node, end } = parseList(lines, i, depth);
        frag.appendChild(node);
        i = end;
        continue;
      }
      if (line.includes('|') && i + 1 < lines.length && TABLE_DELIM.test(lines[i + 1]) && lines[i + 1].includes('-')) {
        const header = splitRow(line);
        const aligns = splitRow(lines[i + 1]).map((d) => {
          const left = d.startsWith(':');
          const right = d.endsWith(':');
          return left && right ? 'center' : right ? 'right' : left ? 'left' : '';
        });
        if (aligns.length === header.length) {
          const rows = [];
          i += 2;
          while (i < lines.length && !isBlank(lines[i]) && lines[i].includes('|')) {
            rows.push(splitRow(lines[i]));
            i++;
          }
          frag.appendChild(table(header, aligns, rows, depth));
          continue;
        }
      }
      // A paragraph: up to a blank line or the start of another block.
      const para = [line.replace(/^ +/, '')];
      i++;
      while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines[i], lines[i + 1])) {
        para.push(lines[i]);
        i++;
      }
      frag.appendChild(appendInline(el('p'), para.join('\n').replace(/\s+$/, ''), depth));
    }
    return frag;
  }

  function render(text) {
    const src = String(text == null ? '' : text).replace(/\r\n?/g, '\n').replace(/\u0000/g, '\uFFFD');
    return parseBlocks(src.split('\n').map(expandTabs), 0);
  }

  global.GlmvMarkdown = Object.freeze({ render, safeUrl, ALLOWED_TAGS });
})(window);
