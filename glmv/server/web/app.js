/*
 * glmv web page: the chat application.
 *
 * Talks only to the OpenAI-compatible API of this origin (relative URLs):
 *   GET  v1/models              model list; a card with glmv.random_weights shows a notice
 *   POST v1/chat/completions    stream: true, stream_options.include_usage; SSE `data: {json}`
 *                               chunks with choices[0].delta.{content, reasoning_content},
 *                               ending `data: [DONE]`; errors as `data: {"error": ...}` or a
 *                               non-200 OpenAI error body.
 * A 401 asks for the API key, keeps it in sessionStorage and retries. Conversations (with their
 * images, already downscaled) live in IndexedDB; settings and the language in localStorage.
 * Model output is rendered only through GlmvMarkdown (markdown.js), which never creates HTML
 * from text; everything else is set with textContent.
 */
'use strict';

(function () {
  // --- configuration ------------------------------------------------------------------------

  const CONFIG = Object.freeze({
    // Images larger than this many pixels are downscaled in the browser (same aspect ratio)
    // before upload: 1920x1920 area-equivalent. A model card may lower it with
    // glmv.max_image_pixels.
    maxImagePixels: 1920 * 1920,
    jpegQuality: 0.9,
    // Files the server reads as they are (anything else is re-encoded as JPEG).
    passThroughTypes: ['image/jpeg', 'image/png', 'image/webp', 'image/gif'],
    maxPassThroughBytes: 8 * 1024 * 1024,
    maxImagesPerMessage: 8,
    titleLength: 48,
    saveEveryMs: 1500,
    dbName: 'glmv',
    dbStore: 'conversations',
    settingsKey: 'glmv.settings',
    currentKey: 'glmv.current',
    apiKeyKey: 'glmv.apiKey',
  });

  const API = { models: 'v1/models', chat: 'v1/chat/completions' };

  const I18N = window.GlmvI18n;
  const MD = window.GlmvMarkdown;

  // --- small helpers ------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const now = () => performance.now();

  function h(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null || v === false) continue;
        if (k === 'class') node.className = v;
        else if (k === 'text') node.textContent = v;
        else if (k === 'dataset') Object.assign(node.dataset, v);
        else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? '' : String(v));
      }
    }
    for (const child of children || []) if (child) node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
    return node;
  }

  function uid() {
    if (crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  function fmt(x, digits) { return Number(x).toFixed(digits); }

  class ApiError extends Error {
    constructor(status, body) {
      const err = (body && typeof body === 'object' && body.error && typeof body.error === 'object') ? body.error : {};
      super(typeof err.message === 'string' && err.message ? err.message : (status ? 'HTTP ' + status : 'error'));
      this.status = status;
      this.type = err.type || null;
      this.param = err.param || null;
      this.code = err.code || null;
    }
  }

  // --- state --------------------------------------------------------------------------------

  const DEFAULT_SETTINGS = {
    model: '', system: '', temperature: '', topP: '', maxTokens: '', thinking: true, mode: 'chat', lang: '',
  };

  const state = {
    settings: loadSettings(),
    lang: 'en',
    models: [],
    conversations: new Map(), // id -> {id, title, created, updated, messages: [...]}
    currentId: null,
    pending: [], // images waiting in the composer: {id, url, name, width, height, origWidth, origHeight}
    gen: null, // {controller, convId, msg}
    renderQueued: false,
  };

  function loadSettings() {
    try {
      const raw = JSON.parse(localStorage.getItem(CONFIG.settingsKey) || '{}');
      return Object.assign({}, DEFAULT_SETTINGS, raw && typeof raw === 'object' ? raw : {});
    } catch (e) {
      return Object.assign({}, DEFAULT_SETTINGS);
    }
  }

  function saveSettings() {
    try { localStorage.setItem(CONFIG.settingsKey, JSON.stringify(state.settings)); } catch (e) { /* private mode */ }
  }

  const t = (key, vars) => I18N.t(state.lang, key, vars);

  // --- modes (hook) -------------------------------------------------------------------------
  // Chat is the only mode today. A mode names its endpoint and builds the request body from the
  // conversation; modes for extraction/moderation register here with GlmvWeb.registerMode and
  // may render their result themselves (renderResult(msg, element) returning true).
  const MODES = new Map();

  function registerMode(name, mode) {
    MODES.set(name, Object.assign({ labelKey: name, endpoint: API.chat, renderResult: null }, mode));
    renderModeSelect();
  }

  function currentMode() { return MODES.get(state.settings.mode) || MODES.get('chat'); }

  // --- storage (IndexedDB, falling back to memory) ------------------------------------------

  const store = {
    db: null,
    open() {
      return new Promise((resolve) => {
        if (!window.indexedDB) { resolve(false); return; }
        let req;
        try { req = indexedDB.open(CONFIG.dbName, 1); } catch (e) { resolve(false); return; }
        req.onupgradeneeded = () => {
          if (!req.result.objectStoreNames.contains(CONFIG.dbStore)) req.result.createObjectStore(CONFIG.dbStore, { keyPath: 'id' });
        };
        req.onsuccess = () => { this.db = req.result; resolve(true); };
        req.onerror = () => resolve(false);
        req.onblocked = () => resolve(false);
      });
    },
    // Writes not yet committed, shown as body[data-pending-writes] so that a caller (or a test)
    // can wait until the stored conversations match the page.
    pending: 0,
    track(delta) {
      this.pending += delta;
      document.body.dataset.pendingWrites = String(this.pending);
    },
    tx(mode, fn) {
      return new Promise((resolve, reject) => {
        if (!this.db) { resolve(null); return; }
        const tx = this.db.transaction(CONFIG.dbStore, mode);
        // An error fires 'error' and then 'abort': count the write out once.
        let counted = mode === 'readwrite';
        if (counted) this.track(1);
        const done = () => { if (counted) { counted = false; this.track(-1); } };
        const result = fn(tx.objectStore(CONFIG.dbStore));
        tx.oncomplete = () => { done(); resolve(result && 'result' in result ? result.result : null); };
        tx.onerror = () => { done(); reject(tx.error); };
        tx.onabort = () => { done(); reject(tx.error || new Error('aborted')); };
      });
    },
    all() { return this.tx('readonly', (s) => s.getAll()).then((r) => r || []); },
    put(conv) { return this.tx('readwrite', (s) => s.put(conv)); },
    remove(id) { return this.tx('readwrite', (s) => s.delete(id)); },
  };

  let storageWarned = false;
  function persist(conv) {
    conv.updated = Date.now();
    // A plain copy: the message objects are live and may change while the write is queued.
    const copy = JSON.parse(JSON.stringify(conv));
    return store.put(copy).catch((e) => {
      if (!storageWarned) { storageWarned = true; toast(t('storageFailed', { msg: e && e.message ? e.message : String(e) })); }
    });
  }

  // --- API ------------------------------------------------------------------------------------

  function apiKey() {
    try { return sessionStorage.getItem(CONFIG.apiKeyKey) || ''; } catch (e) { return ''; }
  }

  function setApiKey(key) {
    try {
      if (key) sessionStorage.setItem(CONFIG.apiKeyKey, key);
      else sessionStorage.removeItem(CONFIG.apiKeyKey);
    } catch (e) { /* storage off: the key lives until reload */ }
    memoryKey = key || '';
    $('forget-key').hidden = !key;
  }
  let memoryKey = '';

  async function readErrorBody(resp) {
    let body = null;
    try {
      const text = await resp.text();
      try { body = JSON.parse(text); } catch (e) { body = { error: { message: text.slice(0, 500) || resp.statusText } }; }
    } catch (e) { /* body unreadable */ }
    return new ApiError(resp.status, body);
  }

  // fetch with the Bearer key; on 401 ask for a key and retry. Returns an ok Response or throws ApiError.
  async function apiFetch(path, init) {
    for (let attempt = 0; ; attempt++) {
      const headers = new Headers((init && init.headers) || {});
      const key = apiKey() || memoryKey;
      if (key) headers.set('Authorization', 'Bearer ' + key);
      const resp = await fetch(path, Object.assign({}, init, { headers }));
      if (resp.ok) return resp;
      const err = await readErrorBody(resp);
      if (resp.status !== 401 || attempt >= 10) throw err;
      // The server's own words matter only when a key was tried and refused.
      const entered = await askForKey(key ? t('keyRejected') : t('keyPrompt'), key ? err.message : '');
      if (!entered) throw err;
      setApiKey(entered);
    }
  }

  let keyPromise = null;
  function askForKey(headline, detail) {
    if (keyPromise) return keyPromise;
    keyPromise = new Promise((resolve) => {
      const dialog = $('key-dialog');
      const input = $('key-input');
      $('key-message').textContent = headline + (detail ? ' (' + detail + ')' : '');
      input.value = '';
      const finish = (value) => {
        $('key-form').removeEventListener('submit', onSubmit);
        $('key-cancel').removeEventListener('click', onCancel);
        dialog.removeEventListener('cancel', onCancel);
        if (dialog.open) dialog.close();
        keyPromise = null;
        resolve(value);
      };
      const onSubmit = (e) => { e.preventDefault(); const v = input.value.trim(); if (v) finish(v); };
      const onCancel = (e) => { e.preventDefault(); finish(null); };
      $('key-form').addEventListener('submit', onSubmit);
      $('key-cancel').addEventListener('click', onCancel);
      dialog.addEventListener('cancel', onCancel);
      dialog.showModal();
      input.focus();
    });
    return keyPromise;
  }

  async function loadModels() {
    clearNotice('server');
    try {
      const resp = await apiFetch(API.models, { headers: { Accept: 'application/json' } });
      const body = await resp.json();
      state.models = Array.isArray(body && body.data) ? body.data.filter((m) => m && typeof m.id === 'string') : [];
      if (!state.models.length) notice('server', t('noModels'), 'warn');
    } catch (e) {
      state.models = [];
      notice('server', t('serverUnreachable', { msg: e.message || String(e) }), 'error');
    }
    if (!state.models.some((m) => m.id === state.settings.model)) {
      state.settings.model = state.models.length ? state.models[0].id : '';
    }
    renderModels();
  }

  function modelCard() { return state.models.find((m) => m.id === state.settings.model) || null; }

  function imagePixelLimit() {
    const card = modelCard();
    const serverLimit = card && card.glmv && Number(card.glmv.max_image_pixels);
    return serverLimit > 0 ? Math.min(serverLimit, CONFIG.maxImagePixels) : CONFIG.maxImagePixels;
  }

  function imagesPerMessageLimit() {
    const card = modelCard();
    const serverLimit = card && card.glmv && Number(card.glmv.max_images_per_request);
    return serverLimit > 0 ? Math.min(serverLimit, CONFIG.maxImagesPerMessage) : CONFIG.maxImagesPerMessage;
  }

  // False when the model's chat template cannot turn thinking off (the card says so).
  function thinkingSwitchable() {
    const card = modelCard();
    return !(card && card.glmv && card.glmv.supports_thinking_toggle === false);
  }

  function buildMessages(history) {
    const out = [];
    const system = (state.settings.system || '').trim();
    if (system) out.push({ role: 'system', content: system });
    for (const msg of history) {
      if (msg.role === 'user') {
        const images = msg.images || [];
        if (!images.length) { out.push({ role: 'user', content: msg.text || '' }); continue; }
        const parts = images.map((img) => ({ type: 'image_url', image_url: { url: img.url } }));
        if (msg.text) parts.push({ type: 'text', text: msg.text });
        out.push({ role: 'user', content: parts });
      } else if (msg.role === 'assistant' && msg.content && !msg.error) {
        out.push({ role: 'assistant', content: msg.content });
      }
    }
    return out;
  }

  function numberSetting(raw, integer) {
    if (raw === '' || raw === null || raw === undefined) return undefined;
    const v = integer ? parseInt(raw, 10) : parseFloat(raw);
    return Number.isFinite(v) ? v : undefined;
  }

  function buildChatRequest(history) {
    const body = {
      model: state.settings.model || undefined,
      messages: buildMessages(history),
      stream: true,
      stream_options: { include_usage: true },
    };
    const temperature = numberSetting(state.settings.temperature, false);
    const topP = numberSetting(state.settings.topP, false);
    const maxTokens = numberSetting(state.settings.maxTokens, true);
    if (temperature !== undefined) body.temperature = temperature;
    if (topP !== undefined) body.top_p = topP;
    if (maxTokens !== undefined) body.max_tokens = maxTokens;
    if (!state.settings.thinking && thinkingSwitchable()) body.thinking = { type: 'disabled' };
    return body;
  }

  // Reads an SSE body, calling onData(object) for each `data:` JSON event until [DONE].
  async function readSSE(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    const handle = (block) => {
      const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
      if (!data) return false;
      if (data.trim() === '[DONE]') return true;
      let obj;
      try { obj = JSON.parse(data); } catch (e) { return false; }
      if (obj && obj.error) throw new ApiError(0, obj);
      onData(obj);
      return false;
    };
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf = (buf + decoder.decode(value, { stream: true })).replace(/\r\n?/g, '\n');
      let idx;
      while ((idx = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, idx);
        buf = buf.slice(idx + 2);
        if (handle(block)) { reader.cancel().catch(() => {}); return; }
      }
    }
    buf += decoder.decode();
    if (buf.trim()) handle(buf);
  }

  // --- conversations ------------------------------------------------------------------------

  function currentConv() { return state.currentId ? state.conversations.get(state.currentId) || null : null; }

  function setCurrent(id) {
    state.currentId = id;
    try { if (id) localStorage.setItem(CONFIG.currentKey, id); else localStorage.removeItem(CONFIG.currentKey); } catch (e) { /* ignore */ }
    renderAll();
  }

  function newConversation() {
    const conv = { id: uid(), title: '', created: Date.now(), updated: Date.now(), messages: [] };
    state.conversations.set(conv.id, conv);
    return conv;
  }

  async function deleteConversation(id) {
    if (state.gen && state.gen.convId === id) state.gen.controller.abort();
    state.conversations.delete(id);
    if (state.currentId === id) setCurrent(null); else renderSidebar();
    try { await store.remove(id); } catch (e) { /* ignore */ }
  }

  function titleFor(text, images) {
    const line = (text || '').replace(/\s+/g, ' ').trim();
    if (line) return line.length > CONFIG.titleLength ? line.slice(0, CONFIG.titleLength - 1) + '…' : line;
    return images && images.length ? t('imageMessage') : t('newChat');
  }

  // --- sending --------------------------------------------------------------------------------

  async function send() {
    if (state.gen) return;
    const input = $('input');
    const text = input.value.replace(/\s+$/, '');
    const images = state.pending.slice();
    if (!text.trim() && !images.length) return;
    let conv = currentConv();
    if (!conv) { conv = newConversation(); state.currentId = conv.id; setCurrent(conv.id); }
    conv.messages.push({
      role: 'user', text, created: Date.now(),
      images: images.map((img) => ({ url: img.url, name: img.name, width: img.width, height: img.height })),
    });
    if (!conv.title) conv.title = titleFor(text, images);
    input.value = '';
    autoGrow();
    state.pending = [];
    renderPending();
    await generate(conv);
  }

  async function regenerate() {
    const conv = currentConv();
    if (!conv || state.gen) return;
    const last = conv.messages[conv.messages.length - 1];
    if (last && last.role === 'assistant') conv.messages.pop();
    if (!conv.messages.length) return;
    await generate(conv);
  }

  function stop() {
    if (state.gen) state.gen.controller.abort();
  }

  async function generate(conv) {
    const mode = currentMode();
    const history = conv.messages.slice();
    const msg = {
      role: 'assistant', content: '', reasoning: '', created: Date.now(), model: state.settings.model,
      mode: state.settings.mode, status: 'streaming', thinking: !!state.settings.thinking, error: null, stats: null,
    };
    conv.messages.push(msg);
    const controller = new AbortController();
    state.gen = { controller, convId: conv.id, msg };
    renderAll();
    persist(conv);

    const t0 = now();
    let tFirst = null;
    let tThinkEnd = null;
    let usage = null;
    let chunks = 0;
    let lastSave = t0;
    try {
      const resp = await apiFetch(mode.endpoint, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
        body: JSON.stringify(mode.buildRequest(history)),
        signal: controller.signal,
      });
      await readSSE(resp, (obj) => {
        if (obj.usage) usage = obj.usage;
        const choice = obj.choices && obj.choices[0];
        if (choice && choice.finish_reason) msg.finish = choice.finish_reason;
        const delta = choice && choice.delta;
        if (!delta) return;
        const r = typeof delta.reasoning_content === 'string' ? delta.reasoning_content : '';
        const c = typeof delta.content === 'string' ? delta.content : '';
        if (!r && !c) return;
        if (tFirst === null) tFirst = now();
        chunks++;
        if (r) msg.reasoning += r;
        if (c) {
          if (msg.reasoning && tThinkEnd === null) tThinkEnd = now();
          msg.content += c;
        }
        scheduleRender();
        if (now() - lastSave > CONFIG.saveEveryMs) { lastSave = now(); persist(conv); }
      });
      msg.status = 'done';
    } catch (e) {
      if (e && e.name === 'AbortError') {
        msg.status = 'stopped';
      } else if (e instanceof ApiError) {
        msg.status = 'error';
        msg.error = { message: e.message, status: e.status, type: e.type, param: e.param, code: e.code };
      } else {
        msg.status = 'error';
        msg.error = { message: t('networkError', { msg: (e && e.message) || String(e) }) };
      }
    } finally {
      const tEnd = now();
      if (msg.reasoning) msg.thinkingMs = Math.round(((tThinkEnd || tEnd) - (tFirst || t0)));
      if (tFirst !== null) {
        const tokens = usage && Number.isFinite(usage.completion_tokens) ? usage.completion_tokens : chunks;
        const span = (tEnd - tFirst) / 1000;
        msg.stats = {
          ttft: (tFirst - t0) / 1000,
          tokens,
          approx: !(usage && Number.isFinite(usage.completion_tokens)),
          tps: tokens > 1 && span > 0 ? (tokens - 1) / span : null,
          promptTokens: usage && usage.prompt_tokens,
          cachedTokens: usage && usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens,
        };
      }
      state.gen = null;
      await persist(conv);
      renderAll();
    }
  }

  // --- images ---------------------------------------------------------------------------------

  function readAsDataURL(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  function decodeImage(file) {
    return new Promise((resolve, reject) => {
      const url = URL.createObjectURL(file);
      const img = new Image();
      img.onload = () => { resolve({ img, release: () => URL.revokeObjectURL(url) }); };
      img.onerror = () => { URL.revokeObjectURL(url); reject(new Error('decode failed')); };
      img.src = url;
    });
  }

  // Decodes the file, downscales it to the pixel limit (keeping the aspect ratio) and returns a
  // data URL; files that need no change are sent as they are.
  async function prepareImage(file) {
    const { img, release } = await decodeImage(file);
    try {
      const width = img.naturalWidth;
      const height = img.naturalHeight;
      if (!width || !height) throw new Error('empty image');
      const limit = imagePixelLimit();
      const tooBig = width * height > limit;
      if (!tooBig && CONFIG.passThroughTypes.includes(file.type) && file.size <= CONFIG.maxPassThroughBytes) {
        return { url: await readAsDataURL(file), width, height, origWidth: width, origHeight: height };
      }
      const scale = tooBig ? Math.sqrt(limit / (width * height)) : 1;
      const w = Math.max(1, Math.floor(width * scale));
      const hgt = Math.max(1, Math.floor(height * scale));
      const canvas = document.createElement('canvas');
      canvas.width = w;
      canvas.height = hgt;
      const ctx = canvas.getContext('2d');
      ctx.fillStyle = '#ffffff'; // transparent areas become white, not black, in JPEG
      ctx.fillRect(0, 0, w, hgt);
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = 'high';
      ctx.drawImage(img, 0, 0, w, hgt);
      return { url: canvas.toDataURL('image/jpeg', CONFIG.jpegQuality), width: w, height: hgt, origWidth: width, origHeight: height };
    } finally {
      release();
    }
  }

  async function addFiles(files) {
    for (const file of files) {
      if (!file) continue;
      const name = file.name || 'image';
      if (!(file.type || '').startsWith('image/')) { toast(t('notImage', { name })); continue; }
      const most = imagesPerMessageLimit();
      if (state.pending.length >= most) { toast(t('tooManyImages', { n: most })); break; }
      const entry = { id: uid(), name, url: null, width: 0, height: 0, loading: true };
      state.pending.push(entry);
      renderPending();
      try {
        Object.assign(entry, await prepareImage(file), { loading: false });
      } catch (e) {
        state.pending = state.pending.filter((p) => p !== entry);
        toast(t('imageUnreadable', { name }));
      }
      renderPending();
    }
  }

  function imageFilesFrom(transfer) {
    if (!transfer) return [];
    const files = Array.from(transfer.files || []).filter((f) => (f.type || '').startsWith('image/'));
    if (files.length) return files;
    const out = [];
    for (const item of Array.from(transfer.items || [])) {
      if (item.kind === 'file' && (item.type || '').startsWith('image/')) {
        const f = item.getAsFile();
        if (f) out.push(f);
      }
    }
    return out;
  }

  // --- rendering ------------------------------------------------------------------------------

  // Notices above the conversation; dismissible ones stay dismissed for this tab.
  const notices = new Map();
  function dismissed(key) {
    try { return sessionStorage.getItem('glmv.dismissed.' + key) === '1'; } catch (e) { return false; }
  }
  function notice(key, text, kind, dismissible) {
    notices.set(key, { text, kind, dismissible: !!dismissible });
    renderNotices();
  }
  function clearNotice(key) { notices.delete(key); renderNotices(); }
  function renderNotices() {
    const box = $('notices');
    box.replaceChildren();
    for (const [key, n] of notices) {
      if (n.dismissible && dismissed(key)) continue;
      box.appendChild(h('div', { class: 'notice ' + (n.kind || 'info'), 'data-notice': key, role: n.kind === 'error' ? 'alert' : 'status' }, [
        h('span', { class: 'notice-text', text: n.text }),
        n.dismissible ? h('button', { type: 'button', class: 'notice-close', 'aria-label': t('dismiss'), title: t('dismiss'), text: '×' }) : null,
      ]));
    }
  }

  let toastTimer = null;
  function toast(text) {
    const box = $('toast');
    box.textContent = text;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  function renderModels() {
    const select = $('setting-model');
    select.replaceChildren();
    for (const m of state.models) select.appendChild(h('option', { value: m.id, text: m.id }));
    select.value = state.settings.model;
    $('model-label').textContent = state.settings.model || '—';
    const card = modelCard();
    if (card && card.glmv && card.glmv.random_weights) notice('random', t('randomWeights', { model: card.id }), 'warn', true);
    else clearNotice('random');
    if (card && card.glmv && card.glmv.demo_model) notice('demo', t('demoModel', { model: card.id }), 'info', true);
    else clearNotice('demo');
    const toggle = $('thinking-toggle');
    const switchable = thinkingSwitchable();
    toggle.disabled = !switchable;
    toggle.checked = switchable ? state.settings.thinking !== false : true;
    toggle.closest('.switch').title = switchable ? '' : t('thinkingAlwaysOn');
    toggle.closest('.switch').classList.toggle('disabled', !switchable);
  }

  function renderModeSelect() {
    const select = $('mode-select');
    if (!select) return;
    select.replaceChildren();
    for (const [name, mode] of MODES) select.appendChild(h('option', { value: name, text: t(mode.labelKey) }));
    select.value = MODES.has(state.settings.mode) ? state.settings.mode : 'chat';
    select.hidden = MODES.size < 2;
  }

  function renderSidebar() {
    const list = $('conversation-list');
    list.replaceChildren();
    const convs = Array.from(state.conversations.values())
      .filter((c) => c.messages.length)
      .sort((a, b) => b.updated - a.updated);
    if (!convs.length) {
      list.appendChild(h('p', { class: 'conversation-empty', text: t('noConversations') }));
      return;
    }
    for (const conv of convs) {
      const item = h('div', { class: 'conversation' + (conv.id === state.currentId ? ' active' : ''), dataset: { id: conv.id } }, [
        h('button', { type: 'button', class: 'conversation-open', title: new Date(conv.updated).toLocaleString(), text: conv.title || t('newChat') }),
        h('button', { type: 'button', class: 'conversation-delete', 'aria-label': t('delete'), title: t('delete'), text: '×' }),
      ]);
      list.appendChild(item);
    }
  }

  function renderPending() {
    const box = $('attachments');
    box.replaceChildren();
    box.hidden = !state.pending.length;
    for (const img of state.pending) {
      const label = img.origWidth && (img.origWidth !== img.width || img.origHeight !== img.height)
        ? t('resized', { w: img.origWidth, h: img.origHeight }) : (img.width ? img.width + '×' + img.height : '');
      box.appendChild(h('figure', { class: 'attachment' + (img.loading ? ' loading' : ''), dataset: { id: img.id }, title: img.name + (label ? ' · ' + label : '') }, [
        img.url ? h('img', { src: img.url, alt: img.name }) : h('div', { class: 'spinner' }),
        h('button', { type: 'button', class: 'attachment-remove', 'aria-label': t('removeImage'), title: t('removeImage'), text: '×' }),
      ]));
    }
    updateComposerState();
  }

  function updateComposerState() {
    const busy = !!state.gen;
    $('send-btn').hidden = busy;
    $('stop-btn').hidden = !busy;
    const loading = state.pending.some((p) => p.loading);
    $('send-btn').disabled = loading || (!$('input').value.trim() && !state.pending.length);
  }

  function statsText(stats) {
    if (!stats) return '';
    const parts = [t('ttft', { s: fmt(stats.ttft, 2) })];
    if (stats.tps) parts.push(t('tps', { v: fmt(stats.tps, 1) }));
    parts.push(t('tokens', { n: (stats.approx ? '~' : '') + stats.tokens }));
    return parts.join(' · ');
  }

  function renderMarkdownInto(node, text) {
    const frag = MD.render(text);
    for (const b of frag.querySelectorAll('.code-copy')) b.textContent = t('copy');
    node.replaceChildren(frag);
  }

  function userMessageEl(msg) {
    const images = (msg.images || []).map((img) => h('img', { class: 'message-image', src: img.url, alt: img.name || t('imageMessage'), loading: 'lazy' }));
    return h('div', { class: 'message user', dataset: { role: 'user' } }, [
      h('div', { class: 'bubble' }, [
        images.length ? h('div', { class: 'message-images' }, images) : null,
        msg.text ? h('div', { class: 'message-text', text: msg.text }) : null,
      ]),
    ]);
  }

  function assistantMessageEl(msg, isLast) {
    const node = h('div', { class: 'message assistant', dataset: { role: 'assistant' } });
    updateAssistantEl(node, msg, isLast);
    return node;
  }

  function updateAssistantEl(node, msg, isLast) {
    const streaming = msg.status === 'streaming';
    node.dataset.state = msg.status || 'done';
    // Thinking block: open while the model thinks, folded once the answer starts (unless the
    // reader opened or closed it by hand).
    let details = node.querySelector(':scope > details.thinking');
    if (msg.reasoning) {
      if (!details) {
        details = h('details', { class: 'thinking' }, [
          h('summary', null, [h('span', { class: 'thinking-label' })]),
          h('div', { class: 'thinking-body markdown' }),
        ]);
        details.open = streaming;
        details.addEventListener('toggle', () => { if (details.dataset.auto !== '1') details.dataset.user = '1'; });
        node.prepend(details);
      }
      const thinkingNow = streaming && !msg.content;
      details.classList.toggle('live', thinkingNow);
      details.querySelector('.thinking-label').textContent = thinkingNow ? t('thinkingLive')
        : msg.thinkingMs ? t('thoughtFor', { s: fmt(msg.thinkingMs / 1000, 1) }) : t('thoughts');
      renderMarkdownInto(details.querySelector('.thinking-body'), msg.reasoning);
      if (details.dataset.user !== '1' && details.open !== thinkingNow) {
        details.dataset.auto = '1';
        details.open = thinkingNow;
        setTimeout(() => { delete details.dataset.auto; }, 0);
      }
    } else if (details) {
      details.remove();
    }

    let answer = node.querySelector(':scope > .answer');
    if (!answer) { answer = h('div', { class: 'answer markdown' }); node.appendChild(answer); }
    const mode = MODES.get(msg.mode || 'chat');
    if (!(mode && mode.renderResult && mode.renderResult(msg, answer))) renderMarkdownInto(answer, msg.content);
    answer.classList.toggle('streaming', streaming);
    answer.hidden = !msg.content && !streaming;
    if (streaming && !msg.content && !msg.reasoning) answer.replaceChildren(h('span', { class: 'typing', 'aria-hidden': 'true' }, [h('i'), h('i'), h('i')]));

    let err = node.querySelector(':scope > .message-error');
    if (msg.error) {
      if (!err) { err = h('div', { class: 'message-error', role: 'alert' }); node.appendChild(err); }
      err.replaceChildren(h('strong', { text: t('error') + (msg.error.status ? ' ' + msg.error.status : '') + ': ' }), document.createTextNode(msg.error.message));
    } else if (err) {
      err.remove();
    }

    let meta = node.querySelector(':scope > .message-meta');
    if (!meta) { meta = h('div', { class: 'message-meta' }); node.appendChild(meta); }
    meta.replaceChildren();
    if (!streaming) {
      if (msg.status === 'stopped') meta.appendChild(h('span', { class: 'badge', text: t('stopped') }));
      if (msg.status === 'interrupted') meta.appendChild(h('span', { class: 'badge', text: t('interrupted') }));
      if (msg.stats) meta.appendChild(h('span', { class: 'stats', text: statsText(msg.stats) }));
      if (msg.status === 'done' && !msg.content && !msg.reasoning) meta.appendChild(h('span', { class: 'badge', text: t('emptyAnswer') }));
      if (msg.status === 'done' && msg.finish === 'length') meta.appendChild(h('span', { class: 'badge', text: t('truncated') }));
      meta.appendChild(h('span', { class: 'spacer' }));
      if (msg.content) meta.appendChild(h('button', { type: 'button', class: 'link-btn', dataset: { action: 'copy' }, text: t('copy') }));
      if (isLast) meta.appendChild(h('button', { type: 'button', class: 'link-btn', dataset: { action: 'regenerate' }, text: t('regenerate') }));
    }
  }

  function nearBottom(box) { return box.scrollHeight - box.scrollTop - box.clientHeight < 80; }

  function renderMessages() {
    const box = $('messages');
    const conv = currentConv();
    const msgs = conv ? conv.messages : [];
    $('empty-state').hidden = msgs.length > 0;
    for (const old of box.querySelectorAll('.message')) old.remove();
    msgs.forEach((msg, i) => {
      const isLast = i === msgs.length - 1;
      const node = msg.role === 'user' ? userMessageEl(msg) : assistantMessageEl(msg, isLast);
      node.dataset.index = String(i);
      box.appendChild(node);
    });
    box.scrollTop = box.scrollHeight;
  }

  function scheduleRender() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(() => {
      state.renderQueued = false;
      const gen = state.gen;
      if (!gen || gen.convId !== state.currentId) return;
      const conv = currentConv();
      const box = $('messages');
      const index = conv.messages.indexOf(gen.msg);
      const node = box.querySelector('.message[data-index="' + index + '"]');
      if (!node) { renderMessages(); return; }
      const stick = nearBottom(box);
      updateAssistantEl(node, gen.msg, true);
      if (stick) box.scrollTop = box.scrollHeight;
    });
  }

  function renderAll() {
    const conv = currentConv();
    $('chat-title').textContent = conv && conv.title ? conv.title : t('newChat');
    document.title = conv && conv.title ? conv.title + ' · glmv' : 'glmv';
    renderSidebar();
    renderMessages();
    updateComposerState();
  }

  function applyLanguage(lang) {
    state.lang = I18N.LANGS.includes(lang) ? lang : 'en';
    document.documentElement.lang = state.lang === 'zh' ? 'zh-CN' : 'en';
    I18N.apply(state.lang);
    const toggle = $('lang-toggle');
    toggle.textContent = state.lang === 'zh' ? 'English' : '中文';
    toggle.lang = state.lang === 'zh' ? 'en' : 'zh';
    $('setting-language').value = state.lang;
    renderModels();
    renderModeSelect();
    renderPending();
    renderAll();
  }

  // --- composer, dialogs, events ------------------------------------------------------------

  function autoGrow() {
    const input = $('input');
    input.style.height = 'auto';
    input.style.height = Math.min(input.scrollHeight, 220) + 'px';
    updateComposerState();
  }

  function openSidebar(open) {
    $('app').classList.toggle('sidebar-open', open);
    $('sidebar-backdrop').hidden = !open;
  }

  function openSettings() {
    const s = state.settings;
    $('setting-model').value = s.model;
    $('setting-system').value = s.system || '';
    $('setting-temperature').value = s.temperature;
    $('setting-top-p').value = s.topP;
    $('setting-max-tokens').value = s.maxTokens;
    $('setting-language').value = state.lang;
    $('forget-key').hidden = !(apiKey() || memoryKey);
    $('settings-dialog').showModal();
  }

  function closeSettings() {
    const s = state.settings;
    s.model = $('setting-model').value || s.model;
    s.system = $('setting-system').value;
    s.temperature = $('setting-temperature').value;
    s.topP = $('setting-top-p').value;
    s.maxTokens = $('setting-max-tokens').value;
    const lang = $('setting-language').value;
    saveSettings();
    if ($('settings-dialog').open) $('settings-dialog').close();
    if (lang !== state.lang) { s.lang = lang; saveSettings(); applyLanguage(lang); } else renderModels();
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {
      const area = h('textarea', { class: 'clipboard-helper' });
      area.value = text;
      document.body.appendChild(area);
      area.select();
      try { document.execCommand('copy'); } catch (e2) { /* nothing more to try */ }
      area.remove();
    }
    if (button) {
      const before = button.textContent;
      button.textContent = t('copied');
      setTimeout(() => { button.textContent = before; }, 1200);
    }
  }

  function bindEvents() {
    $('composer').addEventListener('submit', (e) => { e.preventDefault(); send(); });
    const input = $('input');
    input.addEventListener('input', autoGrow);
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        send();
      } else if (e.key === 'Escape' && state.gen) {
        stop();
      }
    });
    $('stop-btn').addEventListener('click', stop);
    $('attach-btn').addEventListener('click', () => $('file-input').click());
    $('file-input').addEventListener('change', (e) => {
      const files = Array.from(e.target.files || []);
      e.target.value = '';
      addFiles(files);
    });
    document.addEventListener('paste', (e) => {
      const files = imageFilesFrom(e.clipboardData);
      if (!files.length) return;
      // Text copied along with an image (office documents, web pages) is still pasted as text.
      const types = Array.from((e.clipboardData && e.clipboardData.types) || []);
      if (!types.includes('text/plain') || e.target !== $('input')) e.preventDefault();
      addFiles(files);
    });

    // Drag and drop anywhere on the page.
    let dragDepth = 0;
    const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes('Files');
    document.addEventListener('dragenter', (e) => { if (!hasFiles(e)) return; e.preventDefault(); dragDepth++; $('drop-overlay').hidden = false; });
    document.addEventListener('dragover', (e) => { if (!hasFiles(e)) return; e.preventDefault(); e.dataTransfer.dropEffect = 'copy'; });
    document.addEventListener('dragleave', (e) => { if (!hasFiles(e)) return; dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) $('drop-overlay').hidden = true; });
    document.addEventListener('drop', (e) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      dragDepth = 0;
      $('drop-overlay').hidden = true;
      addFiles(imageFilesFrom(e.dataTransfer));
    });

    $('attachments').addEventListener('click', (e) => {
      const btn = e.target.closest('.attachment-remove');
      if (!btn) return;
      const id = btn.parentElement.dataset.id;
      state.pending = state.pending.filter((p) => p.id !== id);
      renderPending();
    });

    $('new-chat').addEventListener('click', () => {
      openSidebar(false);
      if (state.currentId && currentConv() && !currentConv().messages.length) return;
      setCurrent(null);
      $('input').focus();
    });

    $('conversation-list').addEventListener('click', (e) => {
      const item = e.target.closest('.conversation');
      if (!item) return;
      const id = item.dataset.id;
      const del = e.target.closest('.conversation-delete');
      if (del) {
        // Two clicks: the first asks, the second deletes.
        if (del.dataset.confirm === '1') { deleteConversation(id); return; }
        del.dataset.confirm = '1';
        del.textContent = t('confirmDelete');
        item.classList.add('confirming');
        setTimeout(() => {
          if (del.isConnected) { del.dataset.confirm = ''; del.textContent = '×'; item.classList.remove('confirming'); }
        }, 3000);
        return;
      }
      openSidebar(false);
      if (id !== state.currentId) setCurrent(id);
    });

    $('messages').addEventListener('click', (e) => {
      const codeCopy = e.target.closest('.code-copy');
      if (codeCopy) {
        const code = codeCopy.closest('.code-block').querySelector('pre');
        copyText(code ? code.textContent : '', codeCopy);
        return;
      }
      const action = e.target.closest('[data-action]');
      if (action) {
        const node = action.closest('.message');
        const conv = currentConv();
        const msg = conv && conv.messages[Number(node.dataset.index)];
        if (action.dataset.action === 'copy' && msg) copyText(msg.content, action);
        if (action.dataset.action === 'regenerate') regenerate();
        return;
      }
      const img = e.target.closest('.message-image');
      if (img) {
        $('image-viewer-img').src = img.src;
        $('image-viewer').showModal();
      }
    });
    $('image-viewer').addEventListener('click', () => $('image-viewer').close());
    $('notices').addEventListener('click', (e) => {
      const btn = e.target.closest('.notice-close');
      if (!btn) return;
      const key = btn.parentElement.dataset.notice;
      try { sessionStorage.setItem('glmv.dismissed.' + key, '1'); } catch (err) { /* ignore */ }
      renderNotices();
    });

    $('menu-toggle').addEventListener('click', () => openSidebar(!$('app').classList.contains('sidebar-open')));
    $('sidebar-backdrop').addEventListener('click', () => openSidebar(false));
    $('open-settings').addEventListener('click', () => { openSidebar(false); openSettings(); });
    $('model-label').addEventListener('click', openSettings);
    $('settings-form').addEventListener('submit', (e) => { e.preventDefault(); closeSettings(); });
    $('settings-dialog').addEventListener('cancel', (e) => { e.preventDefault(); closeSettings(); });
    $('forget-key').addEventListener('click', () => { setApiKey(''); $('forget-key').hidden = true; toast(t('keyForgotten')); });

    $('lang-toggle').addEventListener('click', () => {
      const lang = state.lang === 'zh' ? 'en' : 'zh';
      state.settings.lang = lang;
      saveSettings();
      applyLanguage(lang);
    });
    const thinking = $('thinking-toggle');
    thinking.addEventListener('change', () => { state.settings.thinking = thinking.checked; saveSettings(); });
    $('mode-select').addEventListener('change', (e) => { state.settings.mode = e.target.value; saveSettings(); });
  }

  // --- start ----------------------------------------------------------------------------------

  async function start() {
    registerMode('chat', { labelKey: 'modeChat', endpoint: API.chat, buildRequest: buildChatRequest });
    state.lang = I18N.pick(state.settings.lang);
    $('thinking-toggle').checked = state.settings.thinking !== false;
    bindEvents();
    applyLanguage(state.lang);

    const opened = await store.open();
    if (!opened) notice('storage', t('storageFailed', { msg: 'IndexedDB' }), 'warn');
    try {
      for (const conv of await store.all()) {
        if (!conv || !conv.id || !Array.isArray(conv.messages)) continue;
        for (const msg of conv.messages) if (msg.status === 'streaming') msg.status = 'interrupted';
        state.conversations.set(conv.id, conv);
      }
    } catch (e) { /* an unreadable store starts empty */ }
    let saved = null;
    try { saved = localStorage.getItem(CONFIG.currentKey); } catch (e) { /* ignore */ }
    state.currentId = saved && state.conversations.has(saved) ? saved : null;
    renderAll();
    await loadModels();
    document.body.dataset.ready = '1';
    $('input').focus();
  }

  window.GlmvWeb = Object.freeze({ registerMode, CONFIG });
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
