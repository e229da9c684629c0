// mmd dashboard: drawn from GET /api/events (server-sent events read with fetch, so that
// the API key can ride in an Authorization header), with GET /models for the registry.
// Every call carries the stored key; a 401 asks for one. State changes are POSTs with JSON.
'use strict';

const KEY_STORE = 'mmd.apiKey';
const LOG_MAX = 300;
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 4000;
// The daemon writes at least a keep-alive comment every 15 s: silence past this is a
// dead connection (a suspended laptop, a dropped network), retried.
const STALL_MS = 40000;
const STATES = ['unspecified', 'unloaded', 'loading', 'ready', 'unloading', 'failed'];

const view = {
  version: '',
  devices: [],
  alerts: new Set(),
  models: new Map(),
  active: 0,
  queued: 0,
  maxConcurrent: 0,
  maxQueue: 0,
  skew: 0, // the daemon's clock minus this browser's, in seconds
  connected: false,
  busy: new Map(), // model id -> the load or unload sent from this page
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// --- formatting (the shapes mmctl prints) -------------------------------------------

function formatSize(bytes) {
  let value = Number(bytes) || 0;
  for (const unit of ['B', 'KiB', 'MiB', 'GiB']) {
    if (Math.abs(value) < 1024) return unit === 'B' ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return `${value.toFixed(1)} TiB`;
}

const sizeOrDash = (bytes) => (bytes ? formatSize(bytes) : '–');

function formatMs(ms) {
  ms = Number(ms) || 0;
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`;
}

function formatDuration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${String(seconds % 60).padStart(2, '0')}s`;
  if (seconds < 86400) {
    const minutes = Math.floor((seconds % 3600) / 60);
    return `${Math.floor(seconds / 3600)}h ${String(minutes).padStart(2, '0')}m`;
  }
  return `${Math.floor(seconds / 86400)}d ${Math.floor((seconds % 86400) / 3600)}h`;
}

function clock(unix) {
  const d = new Date(unix * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, '0')).join(':');
}

function placementText(placement) {
  const total = (placement && placement.total_layers) || 0;
  const gpu = (placement && placement.gpu_layers) || 0;
  if (total === 0 && gpu === 0) return '–';
  if (gpu === 0) return 'cpu';
  if (total === 0 || gpu >= total) return total ? `gpu ${gpu}/${total}` : `gpu ${gpu}`;
  return `split ${gpu}/${total} gpu`;
}

// A child's cores as the kernel writes a CPU list ("0-3,8"), or its args placing them.
function coresText(cores) {
  if (!cores) return '';
  const cpus = cores.cpus || [];
  if (!cpus.length) return ' · cores: args';
  const runs = [];
  for (const cpu of cpus) {
    const last = runs[runs.length - 1];
    if (last && cpu === last[1] + 1) last[1] = cpu;
    else runs.push([cpu, cpu]);
  }
  const list = runs.map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`)).join(',');
  return ` · cores ${list}${cores.shared_with && cores.shared_with.length ? ' shared' : ''}`;
}

const daemonNow = () => Date.now() / 1000 + view.skew;

// --- the API key and calls ------------------------------------------------------------

let keyWaiters = null;

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORE) || '';
  } catch (err) {
    return '';
  }
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// Resolves once the user has given a key (every caller that got a 401 waits on one dialog).
function askKey(refused) {
  if (!keyWaiters) {
    keyWaiters = [];
    const message = $('key-message');
    message.textContent = refused
      ? 'mmd refused the stored key. Enter another one.'
      : 'This mmd asks for an API key (one of [http] api_keys).';
    message.classList.toggle('refused', refused);
    $('key-input').value = '';
    $('key-forget').hidden = !storedKey();
    if (!$('key-dialog').open) $('key-dialog').showModal();
    $('key-input').focus();
  }
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function keyGiven(key) {
  try {
    localStorage.setItem(KEY_STORE, key);
  } catch (err) {
    toast('This browser does not keep the key (no local storage): it is lost on reload.');
    memoryKey = key;
  }
  $('key-dialog').close();
  $('key-button').hidden = false;
  const waiters = keyWaiters || [];
  keyWaiters = null;
  for (const resolve of waiters) resolve();
}

let memoryKey = '';

async function api(path, options) {
  const opts = options || {};
  for (;;) {
    const headers = authHeaders(opts.body !== undefined ? { 'Content-Type': 'application/json' } : {});
    if (!headers.Authorization && memoryKey) headers.Authorization = `Bearer ${memoryKey}`;
    const response = await fetch(path, {
      method: opts.method || 'GET',
      headers,
      body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
      signal: opts.signal,
      cache: 'no-store',
      credentials: 'omit',
    });
    if (response.status !== 401) return response;
    await askKey(Boolean(headers.Authorization));
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (err) {
    /* not JSON */
  }
  return `HTTP ${response.status} ${response.statusText}`;
}

function toast(message) {
  const node = el('div', { class: 'toast', role: 'alert', text: message });
  $('toasts').append(node);
  setTimeout(() => node.remove(), 8000);
}

// --- the event stream -----------------------------------------------------------------

let retryMs = RETRY_MIN_MS;

async function followEvents() {
  for (;;) {
    const control = new AbortController();
    let stall = 0;
    const arm = () => {
      clearTimeout(stall);
      stall = setTimeout(() => control.abort(), STALL_MS);
    };
    try {
      const response = await api('api/events', { signal: control.signal });
      if (!response.ok) throw new Error(await errorText(response));
      arm();
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        arm();
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block
            .split('\n')
            .filter((line) => line.startsWith('data:'))
            .map((line) => line.slice(5).replace(/^ /, ''))
            .join('\n');
          if (data) handleEvent(JSON.parse(data));
        }
      }
    } catch (err) {
      /* the daemon went away, or the connection stalled: retried below */
    }
    clearTimeout(stall);
    control.abort();
    setConnected(false, retryMs);
    await new Promise((resolve) => setTimeout(resolve, retryMs));
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  }
}

function setConnected(connected, retryIn) {
  view.connected = connected;
  const conn = $('conn');
  conn.className = `conn ${connected ? 'conn-ok' : 'conn-down'}`;
  conn.dataset.state = connected ? 'connected' : 'disconnected';
  conn.textContent = connected ? 'connected' : `disconnected · retrying in ${Math.ceil(retryIn / 1000)} s`;
  document.body.classList.toggle('offline', !connected);
  if (!connected) view.busy.clear();
  renderModels();
  renderTryModels();
}

function handleEvent(event) {
  if (typeof event.time === 'number' && event.time > 0) view.skew = event.time - Date.now() / 1000;
  switch (event.type) {
    case 'snapshot':
      retryMs = RETRY_MIN_MS;
      view.version = event.version;
      view.devices = event.devices || [];
      view.active = event.active_inferences;
      view.queued = event.queued_requests;
      view.maxConcurrent = event.max_concurrent;
      view.maxQueue = event.max_queue;
      view.alerts.clear(); // the snapshot's alerts follow it
      for (const model of event.models || []) view.models.set(model.id, model);
      setConnected(true);
      refreshModels();
      break;
    case 'model':
      modelChanged(event);
      break;
    case 'request':
      requestFinished(event);
      refreshModels(); // per-model slot and queue counts have no event of their own
      break;
    case 'memory': {
      view.devices = event.devices || [];
      view.active = event.active_inferences;
      view.queued = event.queued_requests;
      let active = 0;
      let queued = 0;
      for (const model of view.models.values()) {
        active += model.active_requests || 0;
        queued += model.queued_requests || 0;
      }
      if (active !== view.active || queued !== view.queued) refreshModels();
      break;
    }
    case 'alert':
      if (event.above) view.alerts.add(event.device);
      else view.alerts.delete(event.device);
      addLog(event.time, event.above ? 'alert' : 'ok', event.above ? 'alert' : 'memory', [
        el('b', { text: event.device }),
        ` memory ${event.above ? 'above' : 'back below'} ${Math.round(event.threshold_percent)}%`,
        el('span', { class: 'stats', text: ` · used ${Math.round(event.used_percent)}%` }),
      ]);
      break;
    case 'lagged':
      addLog(event.time, 'error', 'lagged', `fell behind: ${event.dropped} events dropped, a snapshot follows`);
      break;
    default:
      return;
  }
  renderHeader();
  renderDevices();
  renderModels();
}

let refreshing = null;
let refreshAgain = false;

// GET /models: the whole registry (the snapshot holds only the models that are loaded).
function refreshModels() {
  if (refreshing) {
    refreshAgain = true;
    return;
  }
  refreshing = (async () => {
    try {
      const response = await api('models');
      if (!response.ok) return;
      const models = await response.json();
      const seen = new Set();
      for (const model of models) {
        seen.add(model.id);
        view.models.set(model.id, model);
      }
      for (const id of [...view.models.keys()]) if (!seen.has(id)) view.models.delete(id);
      renderModels();
      renderTryModels();
    } catch (err) {
      /* the event stream notices a daemon that went away */
    } finally {
      refreshing = null;
      if (refreshAgain) {
        refreshAgain = false;
        setTimeout(refreshModels, 250);
      }
    }
  })();
}

function modelChanged(event) {
  const state = event.state;
  if (event.model && event.model.id) view.models.set(event.model.id, event.model);
  else if (view.models.has(event.model_id)) view.models.get(event.model_id).state = state;
  refreshModels(); // a reload adds and removes models with no event of their own
  let kind = null;
  let label = state;
  if (state === 'ready') kind = 'ready';
  else if (state === 'failed') {
    kind = 'crash';
    label = event.reason === 'crashed' ? 'crash' : 'failed';
  } else if (state === 'unloaded') {
    kind = event.reason === 'evicted' ? 'evicted' : 'unloaded';
    label = event.reason === 'evicted' ? 'evicted' : 'unload';
  }
  if (kind === null) return;
  const parts = [el('b', { text: event.model_id }), ` ${state}`];
  let why = event.reason || '';
  if (event.for_model) why += ` for ${event.for_model}`;
  if (why) parts.push(` (${why})`);
  if (event.detail) parts.push(`: ${event.detail}`);
  const model = event.model;
  if (state === 'ready' && model && model.pid) {
    parts.push(el('span', { class: 'stats', text: ` · pid ${model.pid} · ${placementText(model.placement)}` }));
  }
  addLog(event.time, kind, label, parts);
  renderTryModels();
}

function requestFinished(event) {
  const ok = event.status === 'ok';
  const stats = [`total ${formatMs(event.total_ms)}`];
  if (event.kind === 'infer' && ok) {
    stats.push(
      `first token ${formatMs(event.first_token_ms)}`,
      `${event.completion_tokens} tokens`,
      `${(event.tokens_per_second || 0).toFixed(1)} tok/s`,
    );
  } else if (ok && event.prompt_tokens) {
    stats.push(`${event.prompt_tokens} tokens`);
  }
  if (event.queue_ms >= 1) stats.push(`queue ${formatMs(event.queue_ms)}`);
  const parts = [
    el('b', { text: event.model_id }),
    ` ${event.kind}${ok ? '' : ` ${event.status}`} `,
    el('span', { class: 'stats', text: `· ${stats.join(' · ')}` }),
  ];
  if (event.error) parts.push(`: ${event.error}`);
  addLog(event.time, ok ? 'request' : 'error', event.kind, parts);
}

function addLog(time, kind, label, what) {
  const item = el(
    'li',
    { class: `k-${kind}`, 'data-kind': kind },
    el('span', { class: 'when', text: clock(time) }),
    el('span', { class: 'kind', text: label }),
    el('span', { class: 'what' }, ...(Array.isArray(what) ? what : [what])),
  );
  const log = $('log');
  log.prepend(item);
  while (log.childElementCount > LOG_MAX) log.lastElementChild.remove();
  $('log-empty').hidden = true;
}

// --- drawing --------------------------------------------------------------------------

function renderHeader() {
  setText($('version'), view.version ? `v${view.version}` : '');
  const limit = view.maxConcurrent ? `/${view.maxConcurrent}` : '';
  setText($('counts'), `${view.active}${limit} running · ${view.queued} queued`);
}

const deviceNodes = new Map();

function renderDevices() {
  const box = $('devices');
  if (!view.devices.length) return;
  const ids = new Set(view.devices.map((d) => d.id));
  for (const [id, node] of deviceNodes) {
    if (!ids.has(id)) {
      node.root.remove();
      deviceNodes.delete(id);
    }
  }
  box.querySelector('.empty')?.remove();
  for (const device of view.devices) {
    let node = deviceNodes.get(device.id);
    if (!node) {
      node = {
        id: el('span', { class: 'device-id', text: device.id }),
        name: el('span', { class: 'device-name' }),
        badge: el('span', { class: 'alert-badge', text: 'ALERT', hidden: true }),
        used: el('span', { class: 'device-used' }),
        mmd: el('div', { class: 'seg seg-mmd' }),
        other: el('div', { class: 'seg seg-other' }),
        budget: el('div', { class: 'budget' }),
        numbers: el('div', { class: 'device-numbers' }),
      };
      node.gauge = el('div', { class: 'gauge', role: 'img' }, node.mmd, node.other, node.budget);
      node.root = el(
        'div',
        { class: 'device', 'data-device': device.id },
        el('div', { class: 'device-head' }, node.id, node.name, node.badge, node.used),
        node.gauge,
        node.numbers,
      );
      deviceNodes.set(device.id, node);
      box.append(node.root);
    }
    const total = device.total_bytes || 1;
    const pct = (bytes) => Math.min(100, (100 * bytes) / total);
    // Any use shows: a small model on a large machine is still there.
    const mmd = device.mmd_bytes > 0 ? Math.max(0.6, pct(device.mmd_bytes)) : 0;
    const other = Math.min(100 - mmd, device.other_bytes > 0 ? Math.max(0.6, pct(device.other_bytes)) : 0);
    const used = (100 * (device.total_bytes - device.free_bytes)) / total;
    const alert = view.alerts.has(device.id);
    node.mmd.style.width = `${mmd}%`;
    node.other.style.width = `${other}%`;
    node.budget.style.left = `${pct(device.budget_bytes)}%`;
    node.budget.hidden = !device.budget_bytes;
    node.budget.title = `budget ${formatSize(device.budget_bytes)}`;
    node.root.classList.toggle('alert', alert);
    node.badge.hidden = !alert;
    setText(node.name, device.name && device.name !== device.id ? device.name : device.kind || '');
    setText(node.used, `${used.toFixed(0)}% used`);
    node.gauge.setAttribute(
      'aria-label',
      `${device.id}: mmd ${formatSize(device.mmd_bytes)}, other ${formatSize(device.other_bytes)}, free ${formatSize(device.free_bytes)}`,
    );
    const numbers = [
      ['mmd', device.mmd_bytes],
      ['other', device.other_bytes],
      ['free', device.free_bytes],
      ['budget', device.budget_bytes],
      ['total', device.total_bytes],
    ];
    const text = numbers.map(([k, v]) => `${k} ${formatSize(v)}`).join('|');
    if (node.numbers.dataset.text !== text) {
      node.numbers.dataset.text = text;
      node.numbers.replaceChildren(...numbers.map(([k, v]) => el('span', {}, `${k} `, el('b', { text: formatSize(v) }))));
    }
  }
}

function keepAliveText(model) {
  if (model.active_requests) return 'busy';
  if (model.state !== 'ready') return '–';
  if (model.pinned) return 'pinned';
  if (model.keep_alive_seconds < 0) return 'kept';
  if (model.unloads_at_unix) return `${formatDuration(model.unloads_at_unix - daemonNow())} left`;
  return '–';
}

const rowNodes = new Map();

function modelRow(id) {
  const cell = (cls, label) => el('td', { class: cls, 'data-label': label });
  const row = {
    tr: el('tr', { 'data-model': id }),
    name: el('div', { class: 'model-id', text: id }),
    sub: el('div', { class: 'model-sub' }),
    error: el('div', { class: 'model-error', hidden: true }),
    state: el('span', { class: 'state', 'data-role': 'state' }),
    placement: cell('cell-placement', 'Placement'),
    estimated: cell('cell-est', 'Memory est.'),
    measured: cell('cell-measured', 'Measured'),
    slots: cell('cell-slots', 'Slots'),
    queue: cell('cell-queue', 'Queue'),
    keep: cell('cell-keep', 'Keep-alive'),
    button: el('button', { type: 'button', class: 'small', 'data-action': '' }),
  };
  row.button.addEventListener('click', () => modelAction(id, row.button.dataset.action));
  row.tr.append(
    el('td', { class: 'cell-model' }, row.name, row.sub, row.error),
    el('td', { class: 'cell-state' }, row.state),
    row.placement,
    row.estimated,
    row.measured,
    row.slots,
    row.queue,
    row.keep,
    el('td', { class: 'cell-actions' }, row.button),
  );
  return row;
}

function renderModels() {
  const body = $('models');
  const ids = [...view.models.keys()].sort();
  for (const [id, row] of rowNodes) {
    if (!view.models.has(id)) {
      row.tr.remove();
      rowNodes.delete(id);
    }
  }
  ids.forEach((id, index) => {
    const model = view.models.get(id);
    let row = rowNodes.get(id);
    if (!row) {
      row = modelRow(id);
      rowNodes.set(id, row);
    }
    if (body.children[index] !== row.tr) body.insertBefore(row.tr, body.children[index] || null);
    const state = STATES.includes(model.state) ? model.state : 'unspecified';
    row.tr.className = `state-row-${state}`;
    row.tr.dataset.state = state;
    row.state.className = `state state-${state}`;
    setText(row.state, state);
    const sub = [model.role, model.embedding ? 'embedding' : '', model.pid ? `pid ${model.pid}` : '']
      .filter(Boolean)
      .join(' · ');
    setText(row.sub, sub);
    row.error.hidden = !(model.last_error && state === 'failed');
    setText(row.error, model.last_error || '');
    setText(row.placement, placementText(model.placement) + coresText(model.cores));
    row.placement.title = (model.cores && model.cores.reason) || '';
    setText(row.estimated, sizeOrDash(model.estimated_bytes));
    setText(row.measured, sizeOrDash(model.measured_bytes));
    setText(row.slots, `${model.active_requests || 0}/${model.parallel || 1}`);
    setText(row.queue, String(model.queued_requests || 0));
    setText(row.keep, keepAliveText(model));
    const loaded = state === 'ready' || state === 'loading';
    const action = loaded || state === 'unloading' ? 'unload' : 'load';
    const sent = view.busy.get(id); // a load or unload sent from this page, not answered yet
    let label = action === 'unload' ? 'Unload' : 'Load';
    if (sent === 'load') label = 'Loading…';
    else if (sent === 'unload' || state === 'unloading') label = 'Unloading…';
    row.button.dataset.action = action;
    row.button.className = `small ${action}`;
    setText(row.button, label);
    row.button.disabled = Boolean(sent) || state === 'unloading' || !view.connected;
    row.button.setAttribute('aria-label', `${action === 'unload' ? 'Unload' : 'Load'} ${id}`);
  });
  $('models-empty').hidden = view.models.size > 0;
  const ready = [...view.models.values()].filter((m) => m.state === 'ready').length;
  setText($('model-count'), view.models.size ? `${ready} of ${view.models.size} loaded` : '');
}

async function modelAction(id, action) {
  if (action !== 'load' && action !== 'unload') return;
  view.busy.set(id, action);
  renderModels();
  try {
    const response = await api(action, { method: 'POST', body: { model: id } });
    if (!response.ok) toast(`${action} ${id}: ${await errorText(response)}`);
    else {
      const model = await response.json();
      if (model && model.id) view.models.set(model.id, model);
    }
  } catch (err) {
    toast(`${action} ${id}: the daemon did not answer (${err.message})`);
  } finally {
    view.busy.delete(id);
    renderModels();
    renderTryModels();
  }
}

// --- try a model ----------------------------------------------------------------------

function renderTryModels() {
  const select = $('try-model');
  const models = [...view.models.values()].filter((m) => !m.embedding).sort((a, b) => a.id.localeCompare(b.id));
  const key = models.map((m) => `${m.id}:${m.state}`).join('|');
  if (select.dataset.key === key) return;
  select.dataset.key = key;
  const current = select.value;
  select.replaceChildren(
    ...models.map((m) => el('option', { value: m.id, text: m.state === 'ready' ? m.id : `${m.id} (${m.state}; loads on use)` })),
  );
  const readyOne = models.find((m) => m.state === 'ready');
  if (models.some((m) => m.id === current)) select.value = current;
  else if (readyOne) select.value = readyOne.id;
}

let tryControl = null;

async function sendPrompt(event) {
  event.preventDefault();
  const model = $('try-model').value;
  const prompt = $('try-prompt').value;
  if (!model || !prompt.trim()) return;
  const output = $('try-output');
  const stats = $('try-stats');
  output.textContent = '';
  output.classList.remove('error');
  stats.textContent = 'waiting…';
  $('try-send').disabled = true;
  $('try-stop').disabled = false;
  tryControl = new AbortController();
  const started = performance.now();
  let firstAt = 0;
  let pieces = 0;
  let usage = null;
  let timings = null;
  try {
    const maxTokens = parseInt($('try-max').value, 10);
    const body = { model, messages: [{ role: 'user', content: prompt }], stream: true };
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const response = await api('v1/chat/completions', { method: 'POST', body, signal: tryControl.signal });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split('\n')) {
          if (!line.startsWith('data:')) continue;
          const data = line.slice(5).trim();
          if (data === '[DONE]') {
            finished = true;
            continue;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
          if (chunk.usage) usage = chunk.usage;
          if (chunk.timings) timings = chunk.timings;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          const text = delta && (delta.content || delta.reasoning_content);
          if (text) {
            if (!firstAt) firstAt = performance.now();
            pieces += 1;
            output.append(text);
            output.scrollTop = output.scrollHeight;
          }
        }
      }
    }
    const total = performance.now() - started;
    const tokens = (usage && usage.completion_tokens) || (timings && timings.predicted_n) || pieces;
    const parts = [`total ${formatMs(total)}`];
    if (firstAt) parts.push(`first token ${formatMs(firstAt - started)}`);
    parts.push(`${tokens} tokens`);
    const rate = timings && timings.predicted_per_second;
    if (rate) parts.push(`${rate.toFixed(1)} tok/s`);
    stats.textContent = parts.join(' · ');
  } catch (err) {
    if (err.name === 'AbortError') stats.textContent = 'stopped';
    else {
      stats.textContent = '';
      output.classList.add('error');
      output.textContent = String(err.message || err);
    }
  } finally {
    tryControl = null;
    $('try-send').disabled = false;
    $('try-stop').disabled = true;
  }
}

// --- start ----------------------------------------------------------------------------

function start() {
  $('try').addEventListener('submit', sendPrompt);
  $('try-prompt').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) $('try').requestSubmit();
  });
  $('try-stop').addEventListener('click', () => tryControl && tryControl.abort());
  $('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const key = $('key-input').value.trim();
    if (key) keyGiven(key);
  });
  // Nothing works without a key: the dialog stays until one is given.
  $('key-dialog').addEventListener('cancel', (event) => {
    if (keyWaiters) event.preventDefault();
  });
  $('key-forget').addEventListener('click', () => {
    try {
      localStorage.removeItem(KEY_STORE);
    } catch (err) {
      /* nothing stored */
    }
    memoryKey = '';
    $('key-forget').hidden = true;
    $('key-button').hidden = true;
    if (!keyWaiters) $('key-dialog').close();
  });
  $('key-button').hidden = !storedKey();
  $('key-button').addEventListener('click', () => {
    $('key-message').textContent = 'The key this page sends (one of [http] api_keys).';
    $('key-message').classList.remove('refused');
    $('key-input').value = '';
    $('key-forget').hidden = !storedKey();
    $('key-dialog').showModal();
  });
  setInterval(() => {
    if (view.connected) renderModels(); // keep-alive countdowns
  }, 1000);
  renderHeader();
  followEvents();
}

start();
