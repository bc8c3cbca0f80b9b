// console.js — the Deadlift agent's web console, served by the agent at /ui/console.js.
// One dependency-free script (ES2020, no build step) that signs in with a bearer token,
// routes by URL hash (#/runs, #/runs/<id>, #/traces/<id>, ...) and draws each page from
// the agent's /v1 API. Everything the server sends is someone's input, so the DOM is
// built with createElement/textContent only — never innerHTML — and the page runs under
// a strict Content-Security-Policy (no inline code, no inline style attributes).
'use strict';

(() => {
  const TOKEN_KEY = 'deadlift.token';
  const TENANT_KEY = 'deadlift.tenant';
  const RUN_STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
  const RUN_FILTERS = ['workflow', 'status', 'trace_id'];

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || '',
    tenant: sessionStorage.getItem(TENANT_KEY) || '',
    whoami: null, // {agent, principal, tenant} once signed in
    page: null, // AbortController of the page on screen: aborting it stops its fetches and live stream
  };
  const errors = []; // what the error banner lists until the next navigation

  const $ = (selector) => document.querySelector(selector);

  // ---------------------------------------------------------------- DOM helpers

  // h('a', {href, class, text, dataset, onclick}, ...children): children are nodes or
  // strings (appended as text nodes, so server data can never become markup).
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value == null || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key === 'text') el.textContent = String(value);
      else if (key === 'dataset') Object.assign(el.dataset, value);
      else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? '' : String(value));
    }
    return append(el, children);
  }

  function append(parent, children) {
    for (const child of children) {
      if (child == null || child === false) continue;
      if (Array.isArray(child)) append(parent, child);
      else parent.append(child instanceof Node ? child : String(child));
    }
    return parent;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
    return append(el, children);
  }

  const enc = encodeURIComponent;
  const runHref = (id) => '#/runs/' + enc(id);
  const traceHref = (id) => '#/traces/' + enc(id);
  const moduleHref = (name) => '#/modules/' + enc(name);
  const pad = (n) => String(n).padStart(2, '0');
  const clamp = (n, lo, hi) => Math.min(hi, Math.max(lo, n));
  // A class name derived from server data: only plain words, anything else is "unknown".
  const safeClass = (word) => (typeof word === 'string' && /^[a-z_]+$/.test(word) ? word : 'unknown');

  function timeEl(ms) {
    if (ms == null) return h('span', { class: 'muted', text: '—' });
    const d = new Date(ms);
    if (Number.isNaN(d.getTime())) return String(ms);
    const text = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return h('time', { datetime: d.toISOString(), title: d.toISOString(), text });
  }

  function fmtMs(ms) {
    if (ms == null || !Number.isFinite(ms)) return '—';
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
    return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
  }

  const fmtPercent = (n) => (Number.isFinite(n) ? `${Math.round(n * 10) / 10}%` : '—');

  function fmtBytes(n) {
    if (!Number.isFinite(n)) return '—';
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  // Module ids are long content hashes: show the start, keep the whole in the title.
  const shortId = (id) => (typeof id === 'string' && id.length > 24 ? id.slice(0, id.startsWith('sha256:') ? 19 : 16) + '…' : String(id ?? '—'));
  const abbrev = (id) => h('code', { title: id, text: shortId(id) });
  const truncate = (text, max) => (text.length > max ? text.slice(0, max - 1) + '…' : text);
  const badge = (status) => h('span', { class: `badge status-${safeClass(status)}`, text: status ?? 'unknown' });
  const pretty = (value) => h('pre', { class: 'json', tabindex: 0, text: value === undefined ? '—' : JSON.stringify(value, null, 2) });
  const emptyNote = (text) => h('p', { class: 'empty', text });
  const loadingNote = () => h('p', { class: 'loading', text: 'Loading…' });
  const failureEl = (f) => h('span', { class: 'failure' },
    h('strong', { class: 'error-code', text: f?.code ?? 'error' }), ': ', f?.message ?? '',
    f?.step ? h('span', { class: 'muted', text: ` (step ${f.step})` }) : null);

  // Answers are lists, or objects wrapping one (`{"dead_letters": [...]}`): accept both.
  function asArray(data, key) {
    if (Array.isArray(data)) return data;
    if (data && Array.isArray(data[key])) return data[key];
    const first = data && typeof data === 'object' && Object.values(data).find(Array.isArray);
    return first || [];
  }

  // <dl> from [term, description] pairs; falsy pairs are left out.
  function dl(pairs, cls = 'kv') {
    return h('dl', { class: cls }, pairs.filter(Boolean).map(([term, desc]) =>
      h('div', null, h('dt', { text: term }), h('dd', null, desc))));
  }

  function field(label, control, help) {
    return h('div', { class: 'field' }, h('label', { for: control.id, text: label }), control,
      help ? h('p', { class: 'help', text: help }) : null);
  }

  // A table in a horizontally scrolling, keyboard-focusable wrapper (phones).
  function dataTable(id, caption, columns, rows, empty) {
    const body = h('tbody', null, rows.length ? rows
      : h('tr', { class: 'empty' }, h('td', { colspan: columns.length, text: empty })));
    const table = h('table', { id, class: 'data' }, h('caption', { text: caption }),
      h('thead', null, h('tr', null, columns.map((c) => h('th', { scope: 'col', text: c })))), body);
    return h('div', { class: 'table-wrap', role: 'region', 'aria-label': caption, tabindex: 0 }, table);
  }

  // The page's <h1> (focused after a navigation, for screen readers) and the tab title.
  function heading(view, title, ctx, aside) {
    const h1 = h('h1', { tabindex: '-1', class: 'page-title', text: title });
    view.append(h('div', { class: 'page-head' }, h1, aside));
    document.title = `${title} · Deadlift console`;
    if (ctx && ctx.focus) h1.focus({ preventScroll: false });
    return h1;
  }

  // ---------------------------------------------------------------- banners

  const isAbort = (e) => e && e.name === 'AbortError';

  function showError(err) {
    if (isAbort(err) || (err && err.handled)) return;
    if (!(err instanceof ApiError)) console.error(err);
    errors.push(err);
    $('#error').replaceChildren(
      h('ul', { class: 'banner-list' }, errors.map((e) => h('li', null,
        h('strong', { class: 'error-code', text: e.code || 'error' }), ': ', e.message || String(e),
        e.details != null ? h('details', null, h('summary', { text: 'Details' }), pretty(e.details)) : null))),
      h('button', { type: 'button', class: 'button small secondary', text: 'Dismiss', onclick: clearError }));
  }

  function clearError() {
    errors.length = 0;
    $('#error').replaceChildren();
  }

  function showNotice(...content) {
    $('#notice').replaceChildren(h('p', null, ...content),
      h('button', { type: 'button', class: 'button small secondary', text: 'Dismiss', onclick: clearNotice }));
  }

  function clearNotice() {
    $('#notice').replaceChildren();
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.name = 'ApiError';
      this.status = status;
      this.code = code;
      this.details = details;
    }
  }

  function authHeaders() {
    const headers = { Authorization: 'Bearer ' + state.token };
    if (state.tenant) headers['X-Deadlift-Tenant'] = state.tenant;
    return headers;
  }

  // Every call: the bearer token (and the tenant an admin acts as); JSON back. An error
  // answer `{"error": {code, message, details}}` becomes an ApiError; a 401 signs out.
  async function api(path, { method = 'GET', body, signal } = {}) {
    const headers = { ...authHeaders(), Accept: 'application/json' };
    const init = { method, headers, signal, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      if (isAbort(e)) throw e;
      throw new ApiError(0, 'network_error', `The agent could not be reached (${e.message}).`);
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = text; }
    }
    if (res.ok) return data;
    const err = data && typeof data === 'object' && data.error && typeof data.error === 'object' ? data.error : {};
    const failure = new ApiError(res.status, err.code || `http_${res.status}`,
      err.message || `${res.status} ${res.statusText}`.trim(), err.details);
    if (res.status === 401) {
      failure.handled = true;
      signOut(`Please sign in again — ${failure.code}: ${failure.message}`);
    }
    throw failure;
  }

  // ---------------------------------------------------------------- session

  function showSignin(message) {
    $('#view').replaceChildren();
    $('#nav').hidden = true;
    $('#whoami').hidden = true;
    $('#signout').hidden = true;
    $('#signin-view').hidden = false;
    $('#signin-message').textContent = message || '';
    $('#token').value = '';
    $('#tenant').value = state.tenant;
    document.title = 'Sign in · Deadlift console';
    $('#token').focus();
  }

  function signOut(message) {
    stopPage();
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(TENANT_KEY);
    Object.assign(state, { token: '', tenant: '', whoami: null });
    clearError();
    clearNotice();
    showSignin(message);
  }

  function saveTenant(tenant) {
    state.tenant = tenant;
    if (tenant) sessionStorage.setItem(TENANT_KEY, tenant);
    else sessionStorage.removeItem(TENANT_KEY);
  }

  async function startSession() {
    $('#signin-message').textContent = 'Signing in…';
    try {
      state.whoami = await api('/v1/whoami');
    } catch (e) {
      if (e.handled) return; // 401: the sign-in form is back, with its message
      signOut(`Could not sign in — ${e.code}: ${e.message}`);
      return;
    }
    // A tenant token always acts for its own tenant: a typed tenant means nothing.
    if (state.whoami.principal !== 'admin') saveTenant('');
    $('#signin-view').hidden = true;
    renderHeader();
    route({ focus: false });
  }

  function renderHeader() {
    const w = state.whoami;
    const admin = w.principal === 'admin';
    const role = admin ? (w.tenant ? 'admin, acting as this tenant' : 'admin, no tenant chosen') : 'tenant token';
    $('#whoami').replaceChildren(
      h('span', null, 'Agent ', h('strong', { class: 'who-agent', text: w.agent ?? '?' })), ' ',
      w.tenant ? h('span', null, 'Tenant ', h('strong', { class: 'who-tenant', text: w.tenant })) : '', ' ',
      h('span', { class: 'who-role', text: `(${role})` }));
    $('#whoami').hidden = false;
    $('#signout').hidden = false;
    $('#nav').hidden = false;
    $('#nav-operator').hidden = !admin;
  }

  const needsTenant = () => state.whoami && state.whoami.principal === 'admin' && !state.whoami.tenant;

  // ---------------------------------------------------------------- router

  function parseHash() {
    const raw = location.hash.replace(/^#/, '');
    if (raw && !raw.startsWith('/')) return null; // e.g. "#main": not a route
    const q = raw.indexOf('?');
    const path = q < 0 ? raw : raw.slice(0, q);
    const decode = (s) => { try { return decodeURIComponent(s); } catch { return s; } };
    return {
      parts: path.split('/').filter(Boolean).map(decode),
      params: new URLSearchParams(q < 0 ? '' : raw.slice(q + 1)),
    };
  }

  // A route: the nav link it lights up, whether it needs a tenant, its title and renderer.
  function matchRoute(parts) {
    const [section = 'runs', id, ...rest] = parts;
    if (rest.length) return null;
    const page = (title, render, nav = '#/' + section, tenant = true) => ({ title, render, nav, tenant });
    if (section === 'runs') return id === undefined ? page('Runs', renderRuns) : page('Run', (v, c) => renderRun(v, c, id));
    if (section === 'traces' && id !== undefined) return page('Trace', (v, c) => renderTrace(v, c, id), '#/runs');
    if (section === 'modules' && id !== undefined) return page('Module', (v, c) => renderModule(v, c, id));
    if (id !== undefined) return null;
    switch (section) {
      case 'workflows': return page('Workflows', renderWorkflows);
      case 'modules': return page('Modules', renderModules);
      case 'hooks': return page('Hooks', renderHooks);
      case 'dead-letters': return page('Dead letters', renderDeadLetters);
      case 'peers': return page('Peers', renderPeers);
      case 'operator': return page('Operator', renderOperator, '#/operator', false);
      default: return null;
    }
  }

  function stopPage() {
    if (state.page) state.page.abort();
    state.page = null;
  }

  // Draws the page the hash names into a fresh container. The previous page's fetches
  // and live stream are aborted, so a slow answer can never draw over the new page.
  function route({ focus = false, keepNotice = false } = {}) {
    if (!state.whoami) return;
    const parsed = parseHash();
    if (!parsed && $('#view').childElementCount) return; // an in-page anchor, not a page
    const { parts, params } = parsed || { parts: [], params: new URLSearchParams() };
    stopPage();
    const controller = new AbortController();
    state.page = controller;
    clearError();
    if (!keepNotice) clearNotice();
    const match = matchRoute(parts);
    for (const a of document.querySelectorAll('#nav a')) {
      if (match && a.getAttribute('href') === match.nav) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    const view = h('div', { class: 'page' });
    $('#view').replaceChildren(view);
    const ctx = { signal: controller.signal, params, focus };
    if (!match) {
      heading(view, 'Not found', ctx);
      view.append(h('p', null, 'There is no such page. ', h('a', { href: '#/runs', text: 'Go to the runs' }), '.'));
      return;
    }
    if (match.tenant && needsTenant()) {
      heading(view, match.title, ctx);
      view.append(h('p', { class: 'note', id: 'choose-tenant' },
        'Choose a tenant to act as: you are signed in with the operator’s admin token, which sees a tenant’s data only when it acts as that tenant. Pick one on the ',
        h('a', { href: '#/operator', text: 'Operator page' }), '.'));
      return;
    }
    Promise.resolve()
      .then(() => match.render(view, ctx))
      .catch((e) => {
        if (isAbort(e) || controller.signal.aborted) return;
        for (const el of view.querySelectorAll('.loading')) el.remove();
        showError(e);
      });
  }

  // ---------------------------------------------------------------- runs

  function runDuration(run) {
    if (run.started_unix_ms == null) return null;
    const end = run.finished_unix_ms ?? (isActive(run) ? Date.now() : null);
    return end == null ? null : end - run.started_unix_ms;
  }
  const isActive = (run) => run.status === 'queued' || run.status === 'running';

  function runRow(run) {
    const trace = run.trace_id;
    return h('tr', { dataset: { runId: run.id }, 'data-status': safeClass(run.status) },
      h('th', { scope: 'row' }, h('a', { href: runHref(run.id), class: 'mono', text: run.id })),
      h('td', null, run.workflow ?? '—',
        run.workflow_version != null ? h('span', { class: 'muted', text: ` v${run.workflow_version}` }) : null),
      h('td', null, badge(run.status),
        run.error ? h('span', { class: 'error-inline', title: run.error.message ?? '', text: ' ' + (run.error.code ?? '') }) : null),
      h('td', { text: run.trigger ?? '—' }),
      h('td', null, timeEl(run.created_unix_ms)),
      h('td', { class: 'num', text: fmtMs(runDuration(run)) }),
      h('td', null, trace ? h('a', { href: traceHref(trace), class: 'mono', title: trace, text: shortId(trace) }) : '—'));
  }

  function runFilterForm(filters) {
    const workflow = h('input', { id: 'filter-workflow', name: 'workflow', type: 'text', value: filters.workflow ?? '', spellcheck: 'false' });
    const status = h('select', { id: 'filter-status', name: 'status' },
      h('option', { value: '', text: 'Any' }),
      RUN_STATUSES.map((s) => h('option', { value: s, text: s, selected: filters.status === s })));
    const trace = h('input', { id: 'filter-trace', name: 'trace_id', type: 'text', value: filters.trace_id ?? '', spellcheck: 'false' });
    const form = h('form', { id: 'runs-filter', class: 'filters', role: 'search', 'aria-label': 'Filter runs' },
      field('Workflow', workflow), field('Status', status), field('Trace id', trace),
      h('div', { class: 'filter-actions' },
        h('button', { type: 'submit', class: 'button', text: 'Filter' }),
        h('a', { href: '#/runs', class: 'button secondary', text: 'Clear' })));
    // The filters live in the hash, so they survive reloads and the back button works.
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      for (const [key, value] of new FormData(form)) if (String(value).trim()) q.set(key, String(value).trim());
      const target = '#/runs' + (q.toString() ? '?' + q : '');
      if (location.hash === target) route();
      else location.hash = target;
    });
    return form;
  }

  async function renderRuns(view, ctx) {
    const filters = {};
    for (const key of RUN_FILTERS) if (ctx.params.get(key)) filters[key] = ctx.params.get(key);
    const filtered = Object.keys(filters).length > 0;
    const live = h('span', { id: 'live', class: 'live', role: 'status', 'data-state': 'connecting', text: 'Connecting…' });
    heading(view, 'Runs', ctx, live);
    view.append(runFilterForm(filters));

    const columns = ['Run', 'Workflow', 'Status', 'Trigger', 'Created', 'Duration', 'Trace'];
    const caption = filtered ? 'Runs matching the filters, newest first, updated live' : 'Runs, newest first, updated live';
    const region = dataTable('runs-table', caption, columns, [], 'Loading…');
    // New and changed runs are announced politely (rows added to the table).
    region.id = 'runs-region';
    region.setAttribute('aria-live', 'polite');
    region.setAttribute('aria-relevant', 'additions');
    const tbody = region.querySelector('tbody');
    const older = h('button', { type: 'button', id: 'runs-older', class: 'button secondary', hidden: true, text: 'Older' });
    view.append(region, h('p', { class: 'pager' }, older));

    const rows = new Map(); // run id → its <tr>
    let next = null;
    const showEmpty = () => tbody.replaceChildren(h('tr', { class: 'empty' },
      h('td', { colspan: columns.length, text: filtered ? 'No runs match these filters.' : 'No runs yet.' })));

    async function load(before) {
      const q = new URLSearchParams({ limit: '50', ...filters });
      if (before != null) q.set('before', String(before));
      region.setAttribute('aria-busy', 'true');
      try {
        const page = await api('/v1/runs?' + q, { signal: ctx.signal });
        if (before == null) {
          tbody.replaceChildren();
          rows.clear();
        }
        for (const run of asArray(page, 'runs')) {
          if (rows.has(run.id)) continue;
          const tr = runRow(run);
          rows.set(run.id, tr);
          tbody.append(tr);
        }
        if (!rows.size) showEmpty();
        next = page && page.next != null ? page.next : null;
        older.hidden = next == null;
      } finally {
        region.removeAttribute('aria-busy');
      }
    }

    const matches = (run) => (!filters.workflow || run.workflow === filters.workflow) &&
      (!filters.status || run.status === filters.status) && (!filters.trace_id || run.trace_id === filters.trace_id);

    // A live update replaces its row in place; a new run goes on top if it matches.
    function upsert(run) {
      if (!run || typeof run.id !== 'string') return;
      const existing = rows.get(run.id);
      if (!existing && !matches(run)) return;
      const tr = runRow(run);
      if (existing) existing.replaceWith(tr);
      else {
        const empty = tbody.querySelector('tr.empty');
        if (empty) empty.remove();
        tbody.prepend(tr);
      }
      rows.set(run.id, tr);
    }

    older.addEventListener('click', () => load(next).catch(showError));
    // Subscribe before the first load; updates that arrive meanwhile wait for it.
    let ready = false;
    const pending = [];
    followLive(ctx.signal, live, {
      onRun: (run) => (ready ? upsert(run) : pending.push(run)),
      onGap: () => load(null).catch(showError),
    });
    await load(null);
    ready = true;
    pending.splice(0).forEach(upsert);
  }

  // ---------------------------------------------------------------- live stream (SSE)

  const sleep = (ms, signal) => new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });

  function setLive(indicator, stateName, text, title) {
    indicator.dataset.state = stateName;
    indicator.textContent = text;
    if (title) indicator.title = title;
    else indicator.removeAttribute('title');
  }

  // EventSource cannot send an Authorization header, so the stream is read with fetch and
  // its frames parsed here. It reconnects with backoff, and after a reconnect (or a
  // `lagged` event: updates were dropped) the list is reloaded, since updates were missed.
  async function followLive(signal, indicator, { onRun, onGap }) {
    let failures = 0;
    let connectedBefore = false;
    while (!signal.aborted) {
      setLive(indicator, 'connecting', connectedBefore ? 'Reconnecting…' : 'Connecting…');
      let why = '';
      try {
        const res = await fetch('/v1/runs/live', {
          headers: { ...authHeaders(), Accept: 'text/event-stream' }, signal, cache: 'no-store',
        });
        if (res.status === 401) {
          signOut('Please sign in again — the token is no longer valid.');
          return;
        }
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        setLive(indicator, 'live', 'Live', 'Runs update as they change');
        if (connectedBefore) onGap();
        connectedBefore = true;
        failures = 0;
        await readSse(res.body, (event, data) => {
          if (event === 'lagged') onGap();
          else if (event === 'run') {
            try { onRun(JSON.parse(data)); } catch (e) { console.warn('unreadable run update', e); }
          }
        });
        why = 'the stream ended';
      } catch (e) {
        if (isAbort(e) || signal.aborted) return;
        why = e.message;
      }
      failures += 1;
      const wait = Math.min(30000, 1000 * 2 ** Math.min(failures, 5));
      setLive(indicator, 'offline', 'Offline — retrying', `Live updates stopped (${why}); retrying in ${wait / 1000} s`);
      await sleep(wait, signal);
    }
  }

  // Server-Sent Events framing: `field: value` lines, a blank line ends a frame, lines
  // starting with ':' are comments (keep-alives). Chunks may split lines anywhere.
  async function readSse(body, dispatch) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let event = '';
    let data = [];
    const line = (text) => {
      if (text === '') {
        if (data.length) dispatch(event || 'message', data.join('\n'));
        event = '';
        data = [];
        return;
      }
      if (text.startsWith(':')) return;
      const colon = text.indexOf(':');
      const name = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? '' : text.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (name === 'event') event = value;
      else if (name === 'data') data.push(value);
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r\n|\r|\n/.exec(buffer))) {
        // A '\r' at the very end may be the first half of '\r\n': wait for more.
        if (m[0] === '\r' && m.index === buffer.length - 1) break;
        line(buffer.slice(0, m.index));
        buffer = buffer.slice(m.index + m[0].length);
      }
    }
  }

  // ---------------------------------------------------------------- waterfall

  // When a run was at work: its own times and its steps' (a run's recorded start can
  // come after its first step's), so its bar always covers its steps.
  function extent(run) {
    let start = run.started_unix_ms ?? run.created_unix_ms ?? Infinity;
    let end = run.finished_unix_ms ?? (isActive(run) ? Date.now() : -Infinity);
    for (const step of run.steps || []) {
      start = Math.min(start, step.started_unix_ms);
      end = Math.max(end, step.finished_unix_ms ?? step.started_unix_ms);
    }
    if (!Number.isFinite(start)) start = 0;
    if (!Number.isFinite(end) || end < start) end = start;
    return { start, end };
  }

  // One time axis for a set of runs: from the earliest start to the latest finish.
  function timeSpan(runs) {
    const all = runs.map(extent);
    const start = all.length ? Math.min(...all.map((e) => e.start)) : 0;
    const end = all.length ? Math.max(...all.map((e) => e.end)) : 0;
    return { start, end, total: Math.max(1, end - start) };
  }

  // The bar is decorative: the row's label says the same in text.
  function bar(from, to, span, status) {
    const el = h('div', { class: `wf-bar status-${safeClass(status)}` });
    const left = clamp(((from - span.start) / span.total) * 100, 0, 99.5);
    el.style.left = left + '%';
    el.style.width = clamp(((Math.max(to, from) - from) / span.total) * 100, 0, 100 - left) + '%';
    return h('div', { class: 'wf-track', 'aria-hidden': 'true' }, el);
  }

  function axis(span, label) {
    return h('div', { class: 'wf-axis' },
      h('span', { class: 'wf-axis-label', text: label }),
      h('div', { class: 'wf-scale' },
        h('span', { text: '0 ms' }), h('span', { text: `${Math.round(span.total / 2)} ms` }),
        h('span', { text: `${span.end - span.start} ms` })));
  }

  function stepRow(step, span) {
    const finished = step.finished_unix_ms ?? step.started_unix_ms;
    const took = finished - step.started_unix_ms;
    const label = h('span', { class: 'wf-label' },
      h('span', { class: 'wf-name', text: step.id }), ' ', badge(step.status), ' ',
      h('span', { class: 'wf-dur', text: `${took} ms` }),
      step.attempts > 1 ? h('span', { class: 'muted', text: ` · ${step.attempts} attempts` }) : null);
    return h('li', { class: 'wf-row wf-step', dataset: { step: step.id } },
      h('details', null,
        h('summary', { class: 'wf-summary', title: `+${step.started_unix_ms - span.start} ms` }, label,
          bar(step.started_unix_ms, finished, span, step.status)),
        stepDetails(step)));
  }

  function stepDetails(step) {
    const list = (items, render) => h('ul', { class: 'plain' }, items.map((i) => h('li', null, render(i))));
    return h('div', { class: 'wf-details' },
      dl([
        step.module && ['Module', h('span', null, abbrev(step.module),
          step.version != null ? h('span', { class: 'step-version', text: ` version ${step.version}` }) : null,
          step.canary ? [' ', badge('canary')] : null)],
        ['Attempts', String(step.attempts ?? 1)],
        ['Started', timeEl(step.started_unix_ms)],
        ['Finished', timeEl(step.finished_unix_ms)],
        step.error && ['Error', failureEl(step.error)],
        step.attempt_errors && step.attempt_errors.length && ['Failed attempts',
          h('ol', null, step.attempt_errors.map((e) => h('li', null, failureEl(e))))],
        step.emitted && step.emitted.length && ['Emitted events', list(step.emitted, (id) => h('code', { text: id }))],
        step.clamped && step.clamped.length && ['Narrowed by policy',
          list(step.clamped, (c) => h('code', { text: typeof c === 'string' ? c : JSON.stringify(c) }))],
      ]),
      h('div', { class: 'io' },
        h('div', null, h('h3', { text: 'Input' }), pretty(step.input)),
        h('div', null, h('h3', { text: 'Output' }), pretty(step.output))),
      step.logs && step.logs.length ? [h('h3', { text: 'Logs' }),
        h('ol', { class: 'logs' }, step.logs.map((l) => h('li', { class: `log log-${safeClass(l.level)}` },
          h('span', { class: 'log-level', text: l.level ?? '' }), ' ', l.message ?? '')))] : null,
      step.logs_dropped ? h('p', { class: 'muted', text: `${step.logs_dropped} more log lines were dropped.` }) : null);
  }

  function waterfall(span, items, label = 'Step') {
    return h('div', { id: 'waterfall', class: 'waterfall' }, axis(span, label), h('ol', { class: 'wf-list' }, items));
  }

  // ---------------------------------------------------------------- run

  async function renderRun(view, ctx, id) {
    heading(view, 'Run', ctx);
    view.append(h('p', { class: 'subtitle' }, h('code', { text: id })), loadingNote());
    const run = await api(`/v1/runs/${enc(id)}`, { signal: ctx.signal });
    view.querySelector('.loading').remove();

    const actions = h('div', { class: 'actions' },
      run.trace_id ? h('a', { href: traceHref(run.trace_id), class: 'button secondary', id: 'whole-trace', text: 'Whole trace' }) : null);
    const act = (label, verb, done) => h('button', {
      type: 'button', class: 'button', id: `run-${verb}`, text: label,
      onclick: async (e) => {
        const button = e.currentTarget;
        button.disabled = true;
        try {
          await api(`/v1/runs/${enc(id)}/${verb}`, { method: 'POST', signal: ctx.signal });
          route({ keepNotice: true });
          showNotice(done);
        } catch (err) {
          showError(err);
          if (!ctx.signal.aborted) button.disabled = false;
        }
      },
    });
    if (run.status === 'failed' || run.status === 'cancelled') actions.append(act('Retry', 'retry', 'The run is queued again from its failed step.'));
    if (isActive(run)) actions.append(act('Cancel', 'cancel', 'The run is cancelled.'));

    const steps = run.steps || [];
    const span = timeSpan([run]);
    append(view, [actions,
      dl([
        ['Workflow', h('span', null, h('a', { href: '#/runs?workflow=' + enc(run.workflow), text: run.workflow }), ` version ${run.workflow_version}`)],
        ['Status', badge(run.status)],
        run.error && ['Error', failureEl(run.error)],
        ['Trigger', run.trigger ?? '—'],
        run.event_id && ['Event', h('code', { text: run.event_id })],
        ['Trace', run.trace_id ? h('a', { href: traceHref(run.trace_id), class: 'mono', text: run.trace_id }) : '—'],
        run.traceparent && ['Traceparent', h('code', { text: run.traceparent })],
        ['Created', timeEl(run.created_unix_ms)],
        ['Started', timeEl(run.started_unix_ms)],
        ['Finished', timeEl(run.finished_unix_ms)],
        ['Duration', fmtMs(steps.length ? span.end - span.start : runDuration(run))],
      ], 'kv summary'),
      h('section', { class: 'block', 'aria-labelledby': 'steps-title' },
        h('h2', { id: 'steps-title', text: 'Steps' }),
        steps.length ? waterfall(span, steps.map((s) => stepRow(s, span)))
          : emptyNote(isActive(run) ? 'No step has finished yet.' : 'This run has no journaled steps.')),
      h('section', { class: 'block io' },
        h('div', null, h('h2', { text: 'Input' }), pretty(run.input)),
        h('div', null, h('h2', { text: 'Output' }), pretty(run.output))),
      run.event ? h('section', { class: 'block' }, h('h2', { text: 'Event' }), pretty(run.event)) : null]);

    // A run still going is looked at again shortly (until the page is left).
    if (isActive(run)) sleep(2000, ctx.signal).then(() => { if (!ctx.signal.aborted) route({ keepNotice: true }); });
  }

  // ---------------------------------------------------------------- trace

  async function renderTrace(view, ctx, traceId) {
    heading(view, 'Trace', ctx);
    view.append(h('p', { class: 'subtitle' }, h('code', { text: traceId })), loadingNote());
    const data = await api(`/v1/traces/${enc(traceId)}`, { signal: ctx.signal });
    view.querySelector('.loading').remove();

    // Every run from every side, on one time axis, in the order they started.
    const self = data.agent ?? state.whoami.agent ?? 'this agent';
    const entries = asArray(data.runs, 'runs').map((run) => ({ run, side: self, local: true }));
    const notices = [];
    for (const peer of asArray(data.peers, 'peers')) {
      const side = peer.agent ?? peer.peer ?? 'peer';
      if (peer.error) notices.push({ side, peer: peer.peer ?? side, error: peer.error });
      for (const run of asArray(peer.runs, 'runs')) entries.push({ run, side, local: false });
    }
    for (const entry of entries) entry.extent = extent(entry.run);
    entries.sort((a, b) => a.extent.start - b.extent.start);
    const span = timeSpan(entries.map((e) => e.run));
    const sides = new Set(entries.map((e) => e.side));

    view.append(h('p', null, `${entries.length} run${entries.length === 1 ? '' : 's'} on ${sides.size} agent${sides.size === 1 ? '' : 's'}`,
      entries.length ? `, ${span.end - span.start} ms from the first start to the last finish.` : '.'));
    if (!asArray(data.peers, 'peers').length) {
      view.append(h('p', { class: 'help', id: 'peers-hint' }, "Hold a token on a peer's agent? ",
        h('a', { href: '#/peers', text: 'Add it under Peers' }), ' to see its side here.'));
    }
    if (!entries.length && !notices.length) {
      view.append(emptyNote('No runs of this trace are recorded here or on the peers.'));
      return;
    }
    const items = notices.map((n) => h('li', { class: 'wf-notice', dataset: { side: n.side } },
      h('strong', { text: `${n.peer} (peer)` }), ' could not be asked: ', failureEl(n.error)));
    for (const { run, side, local, extent: { start, end } } of entries) {
      const sideLabel = h('span', { class: `wf-side ${local ? 'local' : 'peer'}`, dataset: { side }, text: `${side} (${local ? 'this agent' : 'peer'})` });
      const name = local ? h('a', { href: runHref(run.id), class: 'wf-name', text: run.workflow ?? run.id })
        : h('span', { class: 'wf-name', title: `${run.id} (on ${side}, not on this agent)`, text: run.workflow ?? run.id });
      items.push(h('li', { class: `wf-group ${local ? 'local' : 'peer'}`, dataset: { runId: run.id, side } },
        h('div', { class: 'wf-group-head' },
          h('span', { class: 'wf-label' }, sideLabel, ' ', name, ' ', badge(run.status), ' ',
            h('span', { class: 'wf-dur', text: `${end - start} ms` })),
          bar(start, end, span, run.status)),
        (run.steps || []).length ? h('ol', { class: 'wf-steps' }, run.steps.map((s) => stepRow(s, span))) : null));
    }
    view.append(h('section', { class: 'block', 'aria-labelledby': 'waterfall-title' },
      h('h2', { id: 'waterfall-title', text: 'Waterfall' }), waterfall(span, items, 'Run and steps')));
  }

  // ---------------------------------------------------------------- modules and hooks

  // Hooks bound to a module: by its name, name@version or id (or pinned to its id).
  function boundHooks(module, hooks) {
    const refs = new Set([module.name, module.id, module.version ? `${module.name}@${module.version}` : null].filter(Boolean));
    return hooks.filter((hook) => hook.binding && (refs.has(hook.binding.module) || refs.has(hook.binding.pinned)));
  }

  function itemList(items, cls) {
    if (!items || !items.length) return h('span', { class: 'muted', text: 'none' });
    return h('ul', { class: `chips ${cls}` }, items.map((i) => h('li', { title: i.kind ?? '' },
      i.module ? h('span', { class: 'muted', text: i.module + ' ' }) : null, h('code', { text: i.name }))));
  }

  // One module's card; on the list its name links to the name's page, where the cards sit
  // under a "Versions" heading (so theirs are one level down).
  function moduleCard(module, hooks, ctx, { level = 'h2', link = true } = {}) {
    const bound = boundHooks(module, hooks);
    const body = h('div', { class: 'manifest-body' });
    const manifest = h('details', { class: 'manifest' }, h('summary', { text: 'Manifest' }), body);
    // The manifest is fetched the first time it is opened.
    manifest.addEventListener('toggle', async () => {
      if (!manifest.open || manifest.dataset.loaded) return;
      manifest.dataset.loaded = 'loading';
      body.replaceChildren(loadingNote());
      try {
        body.replaceChildren(pretty(await api(`/v1/modules/${enc(module.id)}/manifest`, { signal: ctx.signal })));
        manifest.dataset.loaded = 'yes';
      } catch (e) {
        if (e.status === 404) {
          body.replaceChildren(emptyNote('No manifest: its direct calls run with the defaults.'));
          manifest.dataset.loaded = 'none';
        } else {
          body.replaceChildren(emptyNote('The manifest could not be loaded.'));
          delete manifest.dataset.loaded;
          showError(e);
        }
      }
    });
    // Imports grouped by the module they come from (extism:host/env, ...).
    const byModule = new Map();
    for (const item of module.imports || []) {
      const from = item.module ?? '';
      if (!byModule.has(from)) byModule.set(from, []);
      byModule.get(from).push(item);
    }
    return h('article', { class: 'card', dataset: { moduleId: module.id } },
      h(level, null, link ? h('a', { href: moduleHref(module.name), text: module.name }) : module.name,
        module.version ? h('span', { class: 'muted', text: ` @${module.version}` }) : null),
      module.title ? h('p', { class: 'card-title', text: module.title }) : null,
      module.description ? h('p', { text: module.description }) : null,
      dl([
        ['Id', abbrev(module.id)],
        ['Size', fmtBytes(module.size_bytes)],
        ['Pushed', timeEl(module.created_unix_ms)],
        ['Exports', itemList(module.exports, 'exports')],
        ['Imports', byModule.size ? h('ul', { class: 'plain' }, [...byModule].map(([from, items]) =>
          h('li', null, from ? h('code', { class: 'import-from', text: from }) : null,
            itemList(items.map((i) => ({ name: i.name, kind: i.kind })), 'imports')))) : h('span', { class: 'muted', text: 'none' })],
        ['Bound at', bound.length ? h('ul', { class: 'plain' }, bound.map((hook) => h('li', null,
          h('a', { href: '#/hooks', text: hook.name }), ' → ', h('code', { text: hook.binding.function ?? '' }))))
          : h('span', { class: 'muted', text: 'no hook' })],
      ]),
      manifest);
  }

  async function renderModules(view, ctx) {
    heading(view, 'Modules', ctx);
    view.append(loadingNote());
    const [modules, hooks] = await Promise.all([
      api('/v1/modules', { signal: ctx.signal }),
      // Without hooks the modules are still worth showing.
      api('/v1/hooks', { signal: ctx.signal }).catch((e) => { if (isAbort(e)) throw e; showError(e); return []; }),
    ]);
    view.querySelector('.loading').remove();
    const list = asArray(modules, 'modules');
    if (!list.length) {
      view.append(emptyNote('No modules yet. Push one with `deadlift module push`.'));
      return;
    }
    list.sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const hookList = asArray(hooks, 'hooks');
    view.append(h('div', { id: 'modules-list', class: 'cards' }, list.map((m) => moduleCard(m, hookList, ctx))));
  }

  // One module name: its release (what serves the name, promote and roll back) and the
  // versions pushed under it.
  async function renderModule(view, ctx, name) {
    heading(view, 'Module', ctx);
    view.append(h('p', { class: 'subtitle' }, h('code', { text: name })), loadingNote());
    const [modules, hooks, release] = await Promise.all([
      api('/v1/modules', { signal: ctx.signal }),
      api('/v1/hooks', { signal: ctx.signal }).catch((e) => { if (isAbort(e)) throw e; showError(e); return []; }),
      // Settled here: without a release the versions are still worth showing.
      api(`/v1/modules/${enc(name)}/release`, { signal: ctx.signal }).then((status) => ({ status }),
        (error) => { if (isAbort(error)) throw error; return { error }; }),
    ]);
    view.querySelector('.loading').remove();
    const versions = asArray(modules, 'modules').filter((m) => m.name === name)
      .sort((a, b) => (b.created_unix_ms ?? 0) - (a.created_unix_ms ?? 0));
    if (!versions.length) {
      view.append(h('p', { class: 'empty' }, 'No module has this name. ', h('a', { href: '#/modules', text: 'See all modules' }), '.'));
      if (release.error) throw release.error; // module_not_found, in the banner
      return;
    }
    const hookList = asArray(hooks, 'hooks');
    view.append(releaseSection(name, release, ctx),
      h('section', { class: 'block', 'aria-labelledby': 'versions-title' },
        h('h2', { id: 'versions-title', text: 'Versions' }),
        h('p', { class: 'intro', text: 'Every version pushed under this name, newest first. A call of the bare name goes to the release’s live version (or its candidate, for a canary’s share).' }),
        h('div', { id: 'module-versions', class: 'cards' },
          versions.map((m) => moduleCard(m, hookList, ctx, { level: 'h3', link: false })))));
  }

  // A version of a module name: name@version, or its abbreviated id when it has no label.
  const versionText = (name, v) => (v.version != null ? `${name}@${v.version}` : shortId(v.module));
  const versionEl = (name, v) => (!v ? h('span', { class: 'muted', text: 'none' })
    : v.version != null ? h('code', { class: 'version', title: v.module, text: `${name}@${v.version}` }) : abbrev(v.module));

  // The "Release" section: drawn from a release answer, and drawn again from the answer
  // of a promotion or a rollback.
  function releaseSection(name, release, ctx) {
    const title = h('h2', { id: 'release-title', tabindex: '-1', text: 'Release' });
    const body = h('div', { id: 'release-body' });
    const section = h('section', { class: 'block release', id: 'release', 'aria-labelledby': 'release-title' }, title, body);
    const buttons = () => section.querySelectorAll('button[data-release]');
    const show = (status) => {
      body.replaceChildren();
      append(body, releaseBody(name, status, act));
    };

    async function reload() {
      try {
        show(await api(`/v1/modules/${enc(name)}/release`, { signal: ctx.signal }));
      } catch (err) {
        showError(err);
        for (const b of buttons()) b.disabled = false;
      }
    }

    async function act(e) {
      const verb = e.currentTarget.dataset.release;
      for (const b of buttons()) b.disabled = true;
      section.setAttribute('aria-busy', 'true');
      clearError();
      clearNotice();
      try {
        const status = await api(`/v1/modules/${enc(name)}/${verb}`,
          { method: 'POST', body: verb === 'promote' ? {} : undefined, signal: ctx.signal });
        show(status);
        const live = status && status.live ? versionText(name, status.live) : name;
        showNotice(verb === 'promote' ? `Promoted: ${live} is live.` : `Rolled back: ${live} serves every call of ${name}.`);
        title.focus(); // the button is gone: keep focus near
      } catch (err) {
        showError(err);
        if (ctx.signal.aborted) return;
        // Refused because the release changed meanwhile (an automatic rollback, another
        // tab): show it as it is now.
        if (err.status === 409) await reload();
        else for (const b of buttons()) b.disabled = false;
      } finally {
        section.removeAttribute('aria-busy');
      }
    }

    if (release.status) show(release.status);
    else {
      body.replaceChildren(emptyNote(release.error.status === 404 ? 'No release is recorded for this name.' : 'Could not be loaded.'));
      showError(release.error);
    }
    return section;
  }

  function releaseBody(name, status, act) {
    const { live, previous, rollout } = status;
    const history = asArray(status.history, 'history');
    const button = (verb, label, cls, help) => [
      h('button', {
        type: 'button', class: cls, id: `release-${verb}`, dataset: { release: verb }, text: label,
        'aria-describedby': `release-${verb}-help`, onclick: act,
      }),
      h('span', { class: 'help', id: `release-${verb}-help`, text: help })];
    const canRollBack = rollout || previous;
    return [
      dl([
        ['Live', versionEl(name, live)],
        ['Previous', previous ? versionEl(name, previous) : h('span', { class: 'muted', text: 'none' })],
        ['Rollout', rollout ? h('span', null, `${rollout.mode ?? 'rollout'} of `, versionEl(name, rollout.candidate),
          ` on ${fmtPercent(rollout.percent)} of calls`) : h('span', { class: 'muted', text: 'none in progress' })],
      ], 'kv summary release-summary'),
      rollout || canRollBack ? h('div', { class: 'actions release-actions' },
        rollout ? h('div', { class: 'action' }, button('promote', 'Promote candidate', 'button',
          `Makes ${versionText(name, rollout.candidate)} live and ends the rollout.`)) : null,
        canRollBack ? h('div', { class: 'action' }, button('rollback', 'Roll back', 'button secondary', rollout
          ? `Ends the rollout: ${versionText(name, live)} serves every call again.`
          : `Makes ${versionText(name, previous)} live again.`)) : null) : null,
      rollout ? rolloutBlock(name, status) : null,
      h('h3', { id: 'release-history-title', text: 'History' }),
      dataTable('release-history-table', `Release history of ${name}, newest first`, ['Time', 'Action', 'Version', 'Detail'],
        history.map((entry) => h('tr', { dataset: { action: safeClass(entry.action) } },
          h('th', { scope: 'row' }, timeEl(entry.at_unix_ms)),
          h('td', null, badge(entry.action)),
          h('td', null, versionEl(name, entry)),
          h('td', { text: entry.detail ?? '—' }))), 'No history.'),
    ];
  }

  // The rollout in progress: its terms, and how each side is doing.
  function rolloutBlock(name, status) {
    const { live, rollout } = status;
    const shadow = rollout.mode === 'shadow';
    const windowText = rollout.window_s % 60 === 0 && rollout.window_s >= 60 ? `${rollout.window_s / 60} min` : `${rollout.window_s} s`;
    return h('section', { id: 'release-rollout', class: 'rollout', dataset: { mode: safeClass(rollout.mode) }, 'aria-labelledby': 'release-rollout-title' },
      h('h3', { id: 'release-rollout-title', text: shadow ? 'Shadow in progress' : 'Canary in progress' }),
      dl([
        ['Mode', h('span', null, badge(rollout.mode), ' — ', shadow
          ? 'the candidate replays its share of live calls from their tapes and serves none'
          : 'the candidate serves its share of calls')],
        ['Candidate', versionEl(name, rollout.candidate)],
        ['Share', `${fmtPercent(rollout.percent)} of calls`],
        ['Started', timeEl(rollout.started_unix_ms)],
        !shadow && ['Judged', `over ${windowText}, after ${rollout.min_calls} calls; rolled back by itself if its error rate exceeds the live one’s by more than ${rollout.max_error_increase} points`],
      ]),
      shadow ? shadowBlock(name, status.shadow) : canaryWindow(name, live, rollout, status.window, windowText));
  }

  function canaryWindow(name, live, rollout, counts, windowText) {
    if (!counts) return emptyNote('No calls counted yet.');
    const row = (side, version, calls, errs) => h('tr', { dataset: { side: side.toLowerCase() } },
      h('th', { scope: 'row' }, side, h('br'), versionEl(name, version)),
      h('td', { class: 'num', text: String(calls ?? 0) }),
      h('td', { class: 'num', text: String(errs ?? 0) }),
      h('td', { class: 'num', text: calls ? fmtPercent((100 * (errs ?? 0)) / calls) : '—' }));
    return dataTable('release-window-table', `Calls in the last ${windowText}, by side`, ['Side', 'Calls', 'Errors', 'Error rate'], [
      row('Live', live, counts.live_calls, counts.live_errors),
      row('Candidate', rollout.candidate, counts.candidate_calls, counts.candidate_errors),
    ], '');
  }

  const outcomeEl = (outcome) => (outcome && outcome.error ? h('p', null, failureEl(outcome.error)) : pretty(outcome ? outcome.output : undefined));
  const jsonText = (value) => (value === undefined ? '—' : JSON.stringify(value));

  // A shadow: how the candidate's replays compared with the live answers, and the newest
  // calls that were not identical.
  function shadowBlock(name, stats) {
    if (!stats) return emptyNote('Nothing compared yet.');
    const count = (n) => String(n ?? 0);
    const examples = asArray(stats.examples, 'examples');
    return [
      dl([
        ['Compared', count(stats.compared)],
        ['Identical', count(stats.identical)],
        ['Changed', count(stats.changed)],
        ['Newly failing', count(stats.newly_failing)],
        ['No longer failing', count(stats.no_longer_failing)],
        ['Still failing', count(stats.still_failing)],
        ['Diverged', count(stats.diverged)],
        ['Skipped (too many replays)', count(stats.skipped)],
      ], 'kv counts shadow-counts'),
      h('h4', { text: 'Examples' }),
      examples.length ? h('ol', { class: 'plain examples', id: 'shadow-examples' }, examples.map((ex, i) =>
        h('li', { class: 'example', dataset: { verdict: safeClass(ex.verdict) } },
          h('details', { open: i === 0 },
            h('summary', null, timeEl(ex.at_unix_ms), ' ', h('code', { text: ex.function ?? '' }), ' ', badge(ex.verdict)),
            h('div', { class: 'io' },
              h('div', null, h('h5', { text: 'Input' }), pretty(ex.input)),
              h('div', null, h('h5', { text: 'Live' }), outcomeEl(ex.live)),
              h('div', null, h('h5', { text: 'Candidate' }), outcomeEl(ex.candidate))),
            (ex.diff || []).length ? dataTable(`shadow-diff-${i}`, 'Differences in the output, live against candidate', ['Path', 'Live', 'Candidate'],
              ex.diff.map((d) => h('tr', null,
                h('th', { scope: 'row' }, h('code', { text: d.path ?? '/' })),
                h('td', null, h('code', { text: jsonText(d.recorded) })),
                h('td', null, h('code', { text: jsonText(d.replayed) })))), '') : null))))
        : emptyNote(stats.compared ? 'Every compared call was identical.' : 'No call compared yet.'),
    ];
  }

  async function renderHooks(view, ctx) {
    heading(view, 'Hooks', ctx);
    view.append(h('p', { class: 'intro', text: 'Extension points this agent offers, and which of your module functions is bound to each.' }), loadingNote());
    const hooks = asArray(await api('/v1/hooks', { signal: ctx.signal }), 'hooks');
    view.querySelector('.loading').remove();
    const rows = hooks.map((hook) => h('tr', { dataset: { hook: hook.name } },
      h('th', { scope: 'row' }, h('code', { text: hook.name })),
      h('td', { text: hook.description ?? '' }),
      h('td', null, (hook.host_functions || []).length
        ? h('ul', { class: 'chips' }, [...hook.host_functions].map((f) => h('li', null, h('code', { text: f }))))
        : h('span', { class: 'muted', text: 'none' })),
      h('td', { class: 'num', text: hook.timeout_ms != null ? `${hook.timeout_ms} ms` : '—' }),
      h('td', null, hook.binding
        ? [h('code', { text: hook.binding.module }), ' → ', h('code', { text: hook.binding.function ?? '' }),
          hook.binding.pinned ? h('span', { class: 'muted' }, ' (', abbrev(hook.binding.pinned), ')') : null]
        : h('span', { class: 'muted', text: 'not bound' }))));
    view.append(dataTable('hooks-table', 'Hooks', ['Hook', 'Description', 'Host functions', 'Timeout', 'Bound to'],
      rows, 'This agent declares no hooks.'));
  }

  // ---------------------------------------------------------------- workflows

  const stepAction = (step) => {
    if (step.emit) return `emit ${step.emit.type ?? ''}${step.emit.to ? ` → ${step.emit.to}` : ''}`;
    if (step.call) return `call ${step.call}.${step.function ?? '_main'}`;
    return '—';
  };
  const stepCondition = (step) => step.if ?? step.condition;

  // Steps without any `needs` run in order, each after the previous; with `needs` the
  // workflow is a graph. Each step's column is its longest path from a root.
  function layoutSteps(steps) {
    const graph = steps.some((s) => s.needs && s.needs.length);
    const known = new Set(steps.map((s) => s.id));
    const deps = new Map(steps.map((s, i) => [s.id,
      graph ? (s.needs || []).filter((d) => known.has(d)) : i ? [steps[i - 1].id] : []]));
    const depth = new Map();
    const visiting = new Set();
    const depthOf = (id) => {
      if (depth.has(id)) return depth.get(id);
      if (visiting.has(id)) return 0; // a cycle (the agent refuses these): break it
      visiting.add(id);
      const d = deps.get(id).reduce((max, dep) => Math.max(max, depthOf(dep) + 1), 0);
      visiting.delete(id);
      depth.set(id, d);
      return d;
    };
    const columns = [];
    for (const step of steps) {
      const d = depthOf(step.id);
      (columns[d] = columns[d] || []).push(step);
    }
    return { graph, deps, columns: columns.filter(Boolean) };
  }

  function stepGraph(spec, key) {
    const steps = spec.steps || [];
    const { graph, deps, columns } = layoutSteps(steps);
    const W = 210, H = 62, GX = 56, GY = 18, P = 10;
    const pos = new Map();
    columns.forEach((col, c) => col.forEach((step, r) => pos.set(step.id, { x: P + c * (W + GX), y: P + r * (H + GY) })));
    const rows = Math.max(1, ...columns.map((c) => c.length));
    const width = P * 2 + columns.length * W + Math.max(0, columns.length - 1) * GX;
    const height = P * 2 + rows * H + (rows - 1) * GY;
    const arrow = `arrow-${key}`;
    const captionId = `graph-caption-${key}`;
    const edges = [];
    for (const step of steps) {
      const to = pos.get(step.id);
      for (const dep of deps.get(step.id)) {
        const from = pos.get(dep);
        const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x - 2, y2 = to.y + H / 2;
        edges.push(svg('path', {
          class: 'graph-edge' + (stepCondition(step) ? ' conditional' : ''),
          d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}`,
          'marker-end': `url(#${arrow})`,
        }));
      }
    }
    const nodes = steps.map((step) => {
      const { x, y } = pos.get(step.id);
      const cond = stepCondition(step);
      const full = `${step.id}: ${stepAction(step)}${cond ? ` if ${cond}` : ''}`;
      return svg('g', { class: `graph-node ${step.emit ? 'emit' : 'call'}`, 'data-step-id': step.id },
        svg('title', null, full),
        svg('rect', { x, y, width: W, height: H, rx: 6 }),
        svg('text', { x: x + 10, y: y + 20, class: 'node-id' }, truncate(step.id, 24)),
        svg('text', { x: x + 10, y: y + 38, class: 'node-action' }, truncate(stepAction(step), 29)),
        cond ? svg('text', { x: x + 10, y: y + 54, class: 'node-cond' }, truncate(`if ${cond}`, 30)) : null);
    });
    const drawing = svg('svg', { class: 'graph', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-labelledby': captionId },
      svg('defs', null, svg('marker', { id: arrow, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto' },
        svg('path', { d: 'M0,0 L10,5 L0,10 z', class: 'graph-arrow' }))),
      edges, nodes);
    const kind = graph ? `a graph of ${steps.length} steps in ${columns.length} columns` : `a pipeline of ${steps.length} step${steps.length === 1 ? '' : 's'}, in order`;
    return h('figure', { class: 'graph-figure' },
      h('div', { class: 'graph-wrap', tabindex: 0, role: 'group', 'aria-label': `Steps of ${spec.name}` }, drawing),
      h('figcaption', { id: captionId, text: `${spec.name}: ${kind}. Dashed arrows lead to conditional steps.` }));
  }

  // The same steps as a table: the text behind the drawing, and room for conditions.
  function stepTable(spec, key) {
    const { deps } = layoutSteps(spec.steps || []);
    const rows = (spec.steps || []).map((step) => h('tr', null,
      h('th', { scope: 'row' }, h('code', { text: step.id })),
      h('td', null, h('code', { text: stepAction(step) })),
      h('td', { text: deps.get(step.id).join(', ') || '—' }),
      h('td', null, stepCondition(step) ? h('code', { text: stepCondition(step) }) : '—'),
      h('td', null, step.input ? h('code', { text: step.input }) : '—')));
    return h('details', { class: 'step-table' }, h('summary', { text: 'Steps as a table' }),
      dataTable(`steps-${key}`, `Steps of ${spec.name}`, ['Step', 'Does', 'After', 'Condition', 'Input'], rows, 'No steps.'));
  }

  function triggerText(trigger) {
    const parts = [];
    if (trigger && trigger.event) parts.push('event ', h('code', { text: trigger.event }));
    if (trigger && trigger.schedule) parts.push(parts.length ? ', ' : '', 'schedule ', h('code', { text: trigger.schedule }), ' (UTC)');
    return h('span', null, parts.length ? [...parts, ', or over HTTP'] : 'over HTTP only');
  }

  async function renderWorkflows(view, ctx) {
    heading(view, 'Workflows', ctx);
    view.append(loadingNote());
    const list = asArray(await api('/v1/workflows', { signal: ctx.signal }), 'workflows');
    view.querySelector('.loading').remove();
    if (!list.length) {
      view.append(emptyNote('No workflows yet. Apply one with `deadlift workflow apply`.'));
      return;
    }
    list.sort((a, b) => String(a.name).localeCompare(String(b.name)));
    view.append(h('div', { class: 'cards wide' }, list.map((wf, i) => {
      const spec = { ...(wf.spec || {}), name: wf.name ?? (wf.spec && wf.spec.name) };
      return h('article', { class: 'card workflow', dataset: { workflow: spec.name } },
        h('h2', null, spec.name, h('span', { class: 'muted', text: ` version ${wf.version}` })),
        spec.description ? h('p', { text: spec.description }) : null,
        dl([
          ['Trigger', triggerText(spec.trigger)],
          ['Applied', timeEl(wf.created_unix_ms)],
          ['Runs', h('a', { href: '#/runs?workflow=' + enc(spec.name), text: `Runs of ${spec.name}` })],
        ]),
        (spec.steps || []).length ? [stepGraph(spec, i), stepTable(spec, i)] : emptyNote('No steps.'));
    })));
  }

  // ---------------------------------------------------------------- dead letters

  async function renderDeadLetters(view, ctx) {
    heading(view, 'Dead letters', ctx);
    view.append(h('p', { class: 'intro', text: 'Runs that failed for good. Replaying one queues its run again from the failed step.' }), loadingNote());
    const letters = asArray(await api('/v1/dead-letters?include_replayed=true', { signal: ctx.signal }), 'dead_letters');
    view.querySelector('.loading').remove();

    async function replay(e) {
      const button = e.currentTarget;
      const id = button.dataset.replay;
      button.disabled = true;
      try {
        const answer = await api(`/v1/dead-letters/${enc(id)}/replay`, { method: 'POST', signal: ctx.signal });
        const runId = answer && (answer.run_id ?? answer.id ?? (answer.run && answer.run.id));
        route({ keepNotice: true });
        showNotice(`Dead letter ${id} replayed`, runId ? [': run ', h('a', { href: runHref(runId), class: 'mono', text: runId })] : '', '.');
      } catch (err) {
        showError(err);
        if (!ctx.signal.aborted) button.disabled = false;
      }
    }

    const rows = letters.map((letter) => h('tr', { dataset: { deadLetterId: String(letter.id) } },
      h('th', { scope: 'row', class: 'num', text: String(letter.id) }),
      h('td', null, h('a', { href: runHref(letter.run_id), class: 'mono', text: letter.run_id })),
      h('td', { text: letter.workflow ?? '—' }),
      h('td', null, letter.event_id ? h('code', { text: letter.event_id }) : '—'),
      h('td', null, failureEl(letter.error)),
      h('td', null, timeEl(letter.created_unix_ms)),
      h('td', null, letter.replayed_unix_ms != null
        ? h('span', null, 'Replayed ', timeEl(letter.replayed_unix_ms))
        : h('button', {
          type: 'button', class: 'button small', dataset: { replay: String(letter.id) }, text: 'Replay',
          'aria-label': `Replay dead letter ${letter.id} (run ${letter.run_id})`, onclick: replay,
        }))));
    view.append(dataTable('dead-letters-table', 'Dead letters, newest first',
      ['Id', 'Run', 'Workflow', 'Event', 'Error', 'Failed', 'Replay'], rows, 'No dead letters.'));
  }

  // ---------------------------------------------------------------- peers (view tokens)

  async function renderPeers(view, ctx) {
    heading(view, 'Peers', ctx);
    view.append(h('p', { class: 'intro', text: "A token your organisation holds on a peer's agent lets trace pages show that side of a trace; it is stored on this agent and never shown again." }));
    const tableBox = h('div', { id: 'peer-views' }, loadingNote());
    view.append(tableBox);

    async function load() {
      const list = asArray(await api('/v1/peer-views', { signal: ctx.signal }), 'peer_views');
      list.sort((a, b) => String(a.peer).localeCompare(String(b.peer)));
      tableBox.replaceChildren(dataTable('peer-views-table', 'Peers whose side of a trace you can see',
        ['Peer', 'URL', 'Stored at', 'Forget'], list.map((v) => h('tr', { dataset: { peer: v.peer } },
          h('th', { scope: 'row', text: v.peer }),
          h('td', null, h('code', { text: v.url ?? '' })), // text, not a link: it is data
          h('td', null, timeEl(v.updated_unix_ms)),
          h('td', null, h('button', {
            type: 'button', class: 'button small secondary', dataset: { forget: v.peer }, text: 'Forget',
            'aria-label': `Forget the token for peer ${v.peer}`, onclick: forget,
          })))), 'No tokens stored: trace pages show this agent’s side only.'));
    }
    const reload = () => load().catch((err) => {
      if (isAbort(err)) return;
      tableBox.replaceChildren(emptyNote('Could not be loaded.'));
      showError(err);
    });

    async function forget(e) {
      const button = e.currentTarget;
      const peer = button.dataset.forget;
      button.disabled = true;
      clearError();
      try {
        await api(`/v1/peer-views/${enc(peer)}`, { method: 'DELETE', signal: ctx.signal });
        showNotice(`Token for peer ${peer} forgotten.`);
        await reload();
        tableBox.querySelector('.table-wrap')?.focus(); // the button is gone: keep focus near
      } catch (err) {
        showError(err);
        if (err.status === 404) reload(); // already forgotten (another tab): show what is stored
        else if (!ctx.signal.aborted) button.disabled = false;
      }
    }

    const peerInput = h('input', { id: 'peer-view-peer', name: 'peer', type: 'text', required: true, spellcheck: 'false', autocomplete: 'off' });
    const tokenInput = h('input', { id: 'peer-view-token', name: 'token', type: 'password', required: true, spellcheck: 'false', autocomplete: 'off' });
    const submit = h('button', { type: 'submit', class: 'button', text: 'Store token' });
    const form = h('form', { id: 'peer-view-form', class: 'inline-form', 'aria-labelledby': 'peer-view-title' },
      field('Peer', peerInput, 'The peer’s name on this agent.'),
      field('Token', tokenInput, 'Used only to read traces on that agent.'),
      submit);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const peer = peerInput.value.trim();
      if (!peer) {
        peerInput.focus();
        return;
      }
      submit.disabled = true;
      clearError();
      clearNotice();
      try {
        const stored = await api(`/v1/peer-views/${enc(peer)}`, { method: 'PUT', body: { token: tokenInput.value.trim() }, signal: ctx.signal });
        tokenInput.value = '';
        showNotice(`Token for peer ${stored?.peer ?? peer} stored.`);
        await reload();
      } catch (err) {
        showError(err);
      } finally {
        if (!ctx.signal.aborted) submit.disabled = false;
      }
    });
    view.append(h('section', { class: 'block' }, h('h2', { id: 'peer-view-title', text: 'Store a token' }), form));
    await load();
  }

  // ---------------------------------------------------------------- operator

  async function renderOperator(view, ctx) {
    heading(view, 'Operator', ctx);
    if (state.whoami.principal !== 'admin') {
      view.append(h('p', { class: 'note', text: 'This page needs the operator’s admin token.' }));
      return;
    }
    const section = (id, title) => {
      const body = h('div', { class: 'section-body' }, loadingNote());
      view.append(h('section', { class: 'block', id, 'aria-labelledby': `${id}-title` }, h('h2', { id: `${id}-title`, text: title }), body));
      return body;
    };
    const actBody = section('act-as-section', 'Act as tenant');
    const tenantsBody = section('tenants', 'Tenants');
    const peersBody = section('peers', 'Peers');
    const outboxBody = section('outbox', 'Outbox');
    const policyBody = section('policy', 'Policy');

    const [tenants, policy, peers, outbox] = await Promise.allSettled(
      ['/v1/tenants', '/v1/policy', '/v1/peers', '/v1/outbox?limit=100'].map((p) => api(p, { signal: ctx.signal })));
    if (ctx.signal.aborted) return;
    const settle = (result, body, draw) => {
      if (result.status === 'fulfilled') body.replaceChildren(draw(result.value));
      else {
        body.replaceChildren(emptyNote('Could not be loaded.'));
        showError(result.reason);
      }
    };

    const names = tenants.status === 'fulfilled'
      ? asArray(tenants.value, 'tenants').map((t) => (typeof t === 'string' ? t : t.name ?? t.id)).filter(Boolean) : [];
    actBody.replaceChildren(actAsForm(names));
    settle(tenants, tenantsBody, () => (names.length
      ? h('ul', { class: 'chips', id: 'tenant-list' }, names.map((n) => h('li', null, h('code', { text: n }))))
      : emptyNote('No tenants yet.')));
    settle(policy, policyBody, (p) => h('div', null,
      h('p', { class: 'help', text: 'The policy in force: what tenants may grant their plug-ins.' }),
      h('pre', { id: 'policy-json', class: 'json', tabindex: 0, text: JSON.stringify(p, null, 2) })));
    settle(peers, peersBody, (value) => dataTable('peers-table', 'Peer agents',
      ['Name', 'URL', 'Tenant', 'Sends', 'Accepts', 'Public key', 'Added'],
      asArray(value, 'peers').map((p) => h('tr', { dataset: { peer: p.name } },
        h('th', { scope: 'row', text: p.name }),
        h('td', null, h('code', { text: p.url ?? '' })), // text, not a link: it is data
        h('td', { text: p.tenant ?? '—' }),
        h('td', null, patternList(p.send)),
        h('td', null, patternList(p.accept)),
        h('td', null, abbrev(p.public_key)),
        h('td', null, timeEl(p.created_unix_ms)))), 'No peers.'));
    settle(outbox, outboxBody, (value) => dataTable('outbox-table', 'Deliveries to peers, newest first',
      ['Id', 'Peer', 'Event', 'Status', 'Attempts', 'Next attempt', 'Last error', 'Created'],
      asArray(value, 'outbox').map((o) => h('tr', { dataset: { outboxId: String(o.id) } },
        h('th', { scope: 'row', class: 'num', text: String(o.id) }),
        h('td', { text: o.peer ?? '—' }),
        h('td', null, h('code', { text: o.event_id ?? '' })),
        h('td', null, badge(o.status)),
        h('td', { class: 'num', text: String(o.attempts ?? 0) }),
        h('td', null, o.status === 'delivered' ? '—' : timeEl(o.next_attempt_unix_ms)),
        h('td', { text: o.last_error ?? '—' }),
        h('td', null, timeEl(o.created_unix_ms)))), 'No deliveries.'));
  }

  const patternList = (patterns) => (patterns && patterns.length
    ? h('ul', { class: 'chips' }, patterns.map((p) => h('li', null, h('code', { text: p }))))
    : h('span', { class: 'muted', text: 'none' }));

  function actAsForm(names) {
    const current = state.tenant;
    const options = names.includes(current) || !current ? names : [current, ...names];
    const select = h('select', { id: 'act-as', name: 'tenant' },
      h('option', { value: '', text: '— none (operator pages only) —' }),
      options.map((n) => h('option', { value: n, text: n, selected: n === current })));
    const form = h('form', { id: 'act-as-form', class: 'inline-form' },
      field('Tenant', select, 'The tenant whose runs, workflows, modules, dead letters and peer tokens the other pages show.'),
      h('button', { type: 'submit', class: 'button', text: 'Act as tenant' }));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const previous = state.tenant;
      saveTenant(select.value);
      try {
        state.whoami = await api('/v1/whoami');
      } catch (err) {
        if (err.handled) return;
        saveTenant(previous);
        showError(err);
        return;
      }
      renderHeader();
      route({ keepNotice: true });
      showNotice(select.value ? `Acting as tenant ${select.value}. ` : 'No tenant chosen. ',
        select.value ? h('a', { href: '#/runs', text: 'See its runs' }) : null);
    });
    return form;
  }

  // ---------------------------------------------------------------- start

  function init() {
    $('#signin').addEventListener('submit', (e) => {
      e.preventDefault();
      const token = $('#token').value.trim();
      if (!token) return;
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      saveTenant($('#tenant').value.trim());
      startSession();
    });
    $('#signout').addEventListener('click', () => signOut('You are signed out.'));
    // The skip link targets <main>; the hash is the router's, so move focus by hand.
    $('#skip-link').addEventListener('click', (e) => {
      e.preventDefault();
      $('#main').focus();
    });
    window.addEventListener('hashchange', () => route({ focus: true }));
    if (state.token) startSession();
    else showSignin('');
  }

  init();
})();
