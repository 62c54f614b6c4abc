'use strict';
// The Warren dashboard: a single page over the management API (/api, see
// docs/http-api.md). Plain JavaScript, no build step; uPlot draws the charts.
//
// Every string that comes from the broker (queue names, payloads, client
// properties) is user data, so pages are built with DOM nodes and
// textContent (see h()), never by parsing HTML strings that contain it.

(() => {
  const POLL_MS = 2000;
  // Charts keep the last 5 minutes of samples, taken client-side per poll.
  const HISTORY_S = 300;
  const MIN_SAMPLE_GAP_S = 1;
  const MIN_WINDOW_S = 60;
  const AUTH_KEY = 'warren.auth';

  // ------------------------------------------------------------ DOM helpers

  // h('a', {href: '#/x', class: 'y', onclick: fn}, 'text', node, [more]):
  // strings become text nodes, so they are never interpreted as HTML.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith('on') && typeof value === 'function') {
        el.addEventListener(key.slice(2), value);
      } else if (key === 'value' || key === 'checked' || key === 'selected') {
        el[key] = value; // properties, not attributes, so that resets work
      } else {
        el.setAttribute(key, value === true ? '' : String(value));
      }
    }
    appendChildren(el, children);
    return el;
  }

  function appendChildren(el, children) {
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      if (Array.isArray(child)) appendChildren(el, child);
      else el.append(child instanceof Node ? child : String(child));
    }
  }

  // Sets text only when it changed, so that polling does not disturb a
  // selection the user is making in a table.
  function setText(el, text) {
    const value = text === undefined || text === null ? '' : String(text);
    if (el.textContent !== value) el.textContent = value;
  }

  const $ = (id) => document.getElementById(id);

  // -------------------------------------------------------------- formatting

  function fmtInt(n) {
    return typeof n === 'number' ? String(n) : '';
  }

  function fmtRate(r) {
    if (typeof r !== 'number') return '';
    const digits = r >= 100 ? 0 : r >= 10 ? 1 : 2;
    return `${r.toFixed(digits)}/s`;
  }

  function fmtBytes(n) {
    if (typeof n !== 'number') return '';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
  }

  // A duration in ms as the largest unit that keeps it short: 850 ms, 12 s,
  // 4 min 10 s, 3 h 5 min.
  function fmtAge(ms) {
    if (typeof ms !== 'number') return '';
    if (ms < 1000) return `${ms} ms`;
    const s = Math.floor(ms / 1000);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  // {"1": 10, "2": 1, ...}: only the ranges that have messages, "1×: 10, 2×: 1".
  function fmtDeliveries(counts) {
    if (!counts) return '';
    return Object.entries(counts)
      .filter(([, n]) => n > 0)
      .map(([range, n]) => `${range}×: ${n}`)
      .join(', ');
  }

  function fmtBool(b) {
    return b === true ? 'yes' : b === false ? 'no' : '';
  }

  function fmtJson(v) {
    if (v === undefined || v === null) return '';
    if (typeof v === 'object' && Object.keys(v).length === 0) return '';
    return JSON.stringify(v);
  }

  // A rate from a STATS object: stats.publish_details.rate and the like.
  function rate(stats, name) {
    return stats && stats[`${name}_details`] ? stats[`${name}_details`].rate : undefined;
  }

  // Vhosts and names are path segments: "/" must travel as %2F.
  const enc = encodeURIComponent;
  const queuePath = (vhost, name) => `/queues/${enc(vhost)}/${enc(name)}`;
  const queueHash = (vhost, name) => `#${queuePath(vhost, name)}`;

  // ------------------------------------------------------------ credentials

  // Kept in sessionStorage: they last as long as the tab, never on disk.
  const auth = {
    get() {
      try { return JSON.parse(sessionStorage.getItem(AUTH_KEY)); } catch { return null; }
    },
    set(user, password) {
      const basic = base64Utf8(`${user}:${password}`);
      sessionStorage.setItem(AUTH_KEY, JSON.stringify({ user, basic }));
    },
    clear() { sessionStorage.removeItem(AUTH_KEY); },
  };

  // btoa() only takes Latin-1; user names and passwords may be any UTF-8.
  function base64Utf8(text) {
    let binary = '';
    for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
    return btoa(binary);
  }

  // ------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, kind, reason) {
      super(`${kind}: ${reason}`);
      this.status = status;
      this.kind = kind;
      this.reason = reason;
    }
  }

  // Calls /api/<path>; resolves to {status, data}. Errors reject with an
  // ApiError carrying the server's {"error", "reason"}; a 401 also sends the
  // user back to the login form.
  async function request(method, path, body) {
    const creds = auth.get();
    const headers = { Accept: 'application/json', 'X-Requested-With': 'XMLHttpRequest' };
    if (creds) headers.Authorization = `Basic ${creds.basic}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(`/api${path}`, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        // Only our own Authorization header; with credentials 'omit' the
        // browser also does not pop up its own login dialog on a 401
        // (WWW-Authenticate: Basic), per the Fetch standard.
        credentials: 'omit',
      });
    } catch (err) {
      throw new ApiError(0, 'network', `cannot reach the server (${err.message})`);
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = null; }
    }
    if (res.status === 401) {
      const reason = (data && data.reason) || 'the user name or password was not accepted';
      showLogin(`Please log in again: ${reason}.`);
      throw new ApiError(401, 'not_authorized', reason);
    }
    if (!res.ok) {
      const kind = (data && data.error) || `HTTP ${res.status}`;
      const reason = (data && data.reason) || res.statusText || 'request failed';
      throw new ApiError(res.status, kind, reason);
    }
    return { status: res.status, data };
  }

  const api = {
    get: (path) => request('GET', path).then((r) => r.data),
    put: (path, body) => request('PUT', path, body),
    post: (path, body) => request('POST', path, body).then((r) => r.data),
    del: (path) => request('DELETE', path),
  };

  // ---------------------------------------------------------- error banner

  // Errors from polling clear themselves once a poll succeeds again; errors
  // from something the user did stay until dismissed.
  let bannerFromPoll = false;

  function showError(err, fromPoll = false) {
    if (err instanceof ApiError && err.status === 401) return; // the login form says it
    if (!(err instanceof ApiError)) console.error(err);
    bannerFromPoll = fromPoll;
    setText($('banner-text'), err instanceof ApiError ? `${err.kind}: ${err.reason}` : String(err));
    $('banner').hidden = false;
  }

  function hideBanner() {
    $('banner').hidden = true;
    bannerFromPoll = false;
  }

  // Runs an action of the user's (a form, a button); its failure goes to the
  // banner. Resolves to true on success.
  async function act(fn) {
    try {
      await fn();
      return true;
    } catch (err) {
      showError(err);
      return false;
    }
  }

  // ---------------------------------------------------------------- history

  // Samples of a few series over time, trimmed to the last HISTORY_S
  // seconds; data() is the column layout uPlot takes.
  class History {
    constructor(seriesCount) {
      this.times = [];
      this.series = Array.from({ length: seriesCount }, () => []);
    }

    push(values, now = Date.now() / 1000) {
      const clean = values.map((v) => (typeof v === 'number' && Number.isFinite(v) ? v : null));
      // Switching views polls at once: a sample less than a second after
      // the previous one replaces it rather than bunching points together.
      const last = this.times.length - 1;
      if (last >= 0 && now - this.times[last] < MIN_SAMPLE_GAP_S) {
        this.times[last] = now;
        clean.forEach((v, i) => { this.series[i][last] = v; });
        return;
      }
      this.times.push(now);
      clean.forEach((v, i) => this.series[i].push(v));
      let drop = 0;
      while (drop < this.times.length && this.times[drop] < now - HISTORY_S) drop++;
      if (drop > 0) {
        this.times.splice(0, drop);
        this.series.forEach((s) => s.splice(0, drop));
      }
    }

    data() {
      return [this.times, ...this.series];
    }
  }

  // Broker-wide samples, recorded on every poll whatever view is shown.
  const overviewRates = new History(3); // publish, deliver_get, ack per second
  const overviewQueued = new History(2); // ready, unacked
  // Per model: {latency: History(p50, p99 ms), batch: History(p50, mean), last}.
  const modelHistory = new Map();

  function recordOverview(overview) {
    const stats = overview.message_stats || {};
    overviewRates.push([rate(stats, 'publish'), rate(stats, 'deliver_get'), rate(stats, 'ack')]);
    const totals = overview.queue_totals || {};
    overviewQueued.push([totals.messages_ready, totals.messages_unacknowledged]);
  }

  // Versions of one model are served side by side, each with its own card.
  function modelKey(model) {
    return `${model.name}@${model.version}`;
  }

  function recordModel(model) {
    let entry = modelHistory.get(modelKey(model));
    if (!entry) {
      entry = { latency: new History(2), batch: new History(2), last: null };
      modelHistory.set(modelKey(model), entry);
    }
    const inference = model.inference_us || {};
    const toMs = (us) => (typeof us === 'number' ? us / 1000 : null);
    entry.latency.push([toMs(inference.p50), toMs(inference.p99)]);

    // The histogram's count and sum are totals since start: the mean batch
    // of the last interval comes from their change since the previous poll.
    const batch = model.batch_size || {};
    let mean = null;
    if (entry.last && typeof batch.count === 'number' && typeof batch.sum === 'number') {
      const batches = batch.count - entry.last.count;
      if (batches > 0) mean = (batch.sum - entry.last.sum) / batches;
    }
    entry.batch.push([batch.p50, mean]);
    entry.last = { count: batch.count, sum: batch.sum };
    return entry;
  }

  // ------------------------------------------------------------------ charts

  // A uPlot time chart in `container`, sized to its width; `series` is
  // [{label, stroke}], `unit` is appended to values on the y axis.
  function timeChart(container, series, unit = '') {
    if (typeof uPlot !== 'function') {
      container.append(h('p', { class: 'muted' }, 'Charts are unavailable (uPlot did not load).'));
      return { setData() {}, destroy() {} };
    }
    const fmt = (v) => (v === null || v === undefined ? '' : `${+v.toFixed(2)}${unit}`);
    const width = () => Math.max(280, container.clientWidth);
    let destroyed = false;
    const plot = new uPlot({
      width: width(),
      height: 200,
      scales: {
        x: { time: true, auto: false }, // set by setData below
        // From 0, with headroom.
        y: { range: (u, min, max) => [0, Math.max(max * 1.1, 1)] },
      },
      series: [
        {},
        ...series.map((s) => ({ label: s.label, stroke: s.stroke, width: 2, value: (u, v) => fmt(v) })),
      ],
      axes: [
        { values: (u, ticks) => ticks.map(clockTime), space: 80 },
        { values: (u, ticks) => ticks.map(fmt), size: 60 },
      ],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
    }, [[], ...series.map(() => [])], container);
    // Follow the container's width (window resizes, the layout settling).
    const observer = new ResizeObserver(() => {
      if (plot.width !== width()) plot.setSize({ width: width(), height: 200 });
    });
    observer.observe(container);
    return {
      // A poll that was under way when the view went away may still call this.
      setData(data) {
        if (destroyed) return;
        plot.setData(data, false);
        // The time axis shows at least the last minute: uPlot's own range
        // for one or two samples can span years.
        const [start, end] = timeWindow(data[0][0], data[0][data[0].length - 1]);
        plot.setScale('x', { min: start, max: end });
      },
      destroy() { destroyed = true; observer.disconnect(); plot.destroy(); },
    };
  }

  // "14:05:30" in the browser's locale, for the time axes.
  function clockTime(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  }

  // [start, end] of a chart's time axis: the samples it has, or the last
  // minute when they span less than that.
  function timeWindow(first, last) {
    const end = typeof last === 'number' ? last : Date.now() / 1000;
    const start = typeof first === 'number' ? first : end;
    return [Math.min(start, end - MIN_WINDOW_S), end];
  }

  const COLORS = { blue: '#2f6fde', green: '#2e9e5b', orange: '#e08a1e', red: '#d6453d', purple: '#7b5cd6' };

  // ---------------------------------------------------------------- tables

  // A table whose rows are kept in place across polls, keyed by `key(item)`:
  // rows are updated, added and removed rather than the table being rebuilt.
  // Each column is {head, cls, render(td, item)}; `rowAttrs(item)` gives the
  // row's attributes (e.g. data-queue).
  function liveTable({ columns, key, rowAttrs, empty, id }) {
    const tbody = h('tbody');
    const table = h('table', { class: 'data' },
      h('thead', null, h('tr', null, columns.map((c) => h('th', { class: c.cls }, c.head)))),
      tbody);
    const emptyNote = h('p', { class: 'muted empty' }, empty);
    const rows = new Map();

    function update(items) {
      const seen = new Set();
      let position = tbody.firstChild;
      for (const item of items) {
        const k = key(item);
        seen.add(k);
        let tr = rows.get(k);
        if (!tr) {
          tr = h('tr', rowAttrs ? rowAttrs(item) : null,
            columns.map((c) => h('td', { class: c.cls })));
          rows.set(k, tr);
        }
        columns.forEach((c, i) => c.render(tr.cells[i], item));
        // Keep the order of `items`, moving only rows that are out of place.
        if (tr !== position) tbody.insertBefore(tr, position);
        else position = position.nextSibling;
      }
      for (const [k, tr] of rows) {
        if (!seen.has(k)) { tr.remove(); rows.delete(k); }
      }
      emptyNote.hidden = items.length > 0;
      table.hidden = items.length === 0;
    }

    return { element: h('div', { class: 'table-wrap', id }, table, emptyNote), update };
  }

  // Column helpers: a text cell, and a cell holding one link.
  const textCol = (head, cls, value) => ({ head, cls, render: (td, item) => setText(td, value(item)) });
  const numCol = (head, cls, value) => ({ head, cls: `${cls} num`, render: (td, item) => setText(td, value(item)) });

  function linkCol(head, cls, href, text) {
    return {
      head,
      cls,
      render(td, item) {
        let a = td.firstChild;
        if (!a) { a = h('a'); td.append(a); }
        if (a.getAttribute('href') !== href(item)) a.setAttribute('href', href(item));
        setText(a, text(item));
      },
    };
  }

  // ------------------------------------------------------------------ views

  // A view is mount(root, params) -> {refresh(overview), destroy()}; refresh
  // runs on every poll with the /api/overview just fetched.

  function overviewView(root) {
    const values = {}; // id -> the tile's value element
    const tile = (label, id) => h('div', { class: 'tile' },
      (values[id] = h('div', { class: 'tile-value', id }, '–')),
      h('div', { class: 'tile-label' }, label));
    const ratesBox = h('div', { class: 'chart', id: 'chart-rates' });
    const queuedBox = h('div', { class: 'chart', id: 'chart-queued' });
    const listeners = liveTable({
      key: (l) => `${l.protocol} ${l.ip_address} ${l.port}`,
      empty: 'No listeners reported.',
      columns: [
        textCol('Protocol', 'protocol', (l) => l.protocol),
        textCol('Address', 'ip-address', (l) => l.ip_address),
        numCol('Port', 'port', (l) => fmtInt(l.port)),
      ],
    });
    const nodeInfo = h('p', { class: 'muted' });

    root.append(
      h('h2', null, 'Overview'),
      nodeInfo,
      h('div', { class: 'tiles' },
        tile('Connections', 'total-connections'),
        tile('Channels', 'total-channels'),
        tile('Exchanges', 'total-exchanges'),
        tile('Queues', 'total-queues'),
        tile('Consumers', 'total-consumers'),
        tile('Messages', 'total-messages'),
        tile('Ready', 'total-messages-ready'),
        tile('Unacked', 'total-messages-unacked')),
      h('div', { class: 'charts' },
        h('div', { class: 'card' }, h('h3', null, 'Message rates'), ratesBox),
        h('div', { class: 'card' }, h('h3', null, 'Queued messages'), queuedBox)),
      h('h3', null, 'Listeners'),
      listeners.element);

    const rates = timeChart(ratesBox, [
      { label: 'publish', stroke: COLORS.blue },
      { label: 'deliver / get', stroke: COLORS.green },
      { label: 'ack', stroke: COLORS.orange },
    ], '/s');
    const queued = timeChart(queuedBox, [
      { label: 'ready', stroke: COLORS.blue },
      { label: 'unacked', stroke: COLORS.red },
    ]);
    rates.setData(overviewRates.data());
    queued.setData(overviewQueued.data());

    return {
      refresh(overview) {
        const o = overview.object_totals || {};
        const q = overview.queue_totals || {};
        const set = (id, v) => setText(values[id], fmtInt(v) || '–');
        set('total-connections', o.connections);
        set('total-channels', o.channels);
        set('total-exchanges', o.exchanges);
        set('total-queues', o.queues);
        set('total-consumers', o.consumers);
        set('total-messages', q.messages);
        set('total-messages-ready', q.messages_ready);
        set('total-messages-unacked', q.messages_unacknowledged);
        setText(nodeInfo, [overview.node && `Node ${overview.node}`,
          overview.cluster_name && `cluster ${overview.cluster_name}`,
          overview.rabbitmq_version && `RabbitMQ-compatible ${overview.rabbitmq_version}`]
          .filter(Boolean).join(' · '));
        listeners.update(overview.listeners || []);
        rates.setData(overviewRates.data());
        queued.setData(overviewQueued.data());
      },
      destroy() { rates.destroy(); queued.destroy(); },
    };
  }

  function queuesView(root) {
    const table = liveTable({
      key: (q) => `${q.vhost}/${q.name}`,
      rowAttrs: (q) => ({ 'data-queue': `${q.vhost}/${q.name}` }),
      empty: 'No queues yet.',
      columns: [
        linkCol('Name', 'name', (q) => queueHash(q.vhost, q.name), (q) => q.name),
        textCol('Vhost', 'vhost', (q) => q.vhost),
        textCol('Type', 'type', (q) => q.type),
        textCol('State', 'state', (q) => q.state),
        numCol('Ready', 'messages-ready', (q) => fmtInt(q.messages_ready)),
        numCol('Unacked', 'messages-unacked', (q) => fmtInt(q.messages_unacknowledged)),
        numCol('Total', 'messages', (q) => fmtInt(q.messages)),
        numCol('Publish', 'publish-rate', (q) => fmtRate(rate(q.message_stats, 'publish'))),
        numCol('Deliver / get', 'deliver-rate', (q) => fmtRate(rate(q.message_stats, 'deliver_get'))),
        numCol('Ack', 'ack-rate', (q) => fmtRate(rate(q.message_stats, 'ack'))),
        numCol('Consumers', 'consumers', (q) => fmtInt(q.consumers)),
      ],
    });

    root.append(h('h2', null, 'Queues'), table.element, addQueueForm(() => view.refresh()));

    const view = {
      async refresh() {
        const queues = await api.get('/queues');
        queues.sort((a, b) => a.vhost.localeCompare(b.vhost) || a.name.localeCompare(b.name));
        table.update(queues);
      },
    };
    return view;
  }

  function addQueueForm(onAdded) {
    const status = h('span', { class: 'form-status', role: 'status' });
    const form = h('form', { class: 'card inline-form', id: 'add-queue-form' },
      h('h3', null, 'Add a queue'),
      field('Vhost', h('input', { id: 'add-queue-vhost', name: 'vhost', value: '/', required: true })),
      field('Name', h('input', { id: 'add-queue-name', name: 'name', required: true })),
      field('Type', h('select', { id: 'add-queue-type', name: 'type' },
        h('option', { value: 'classic' }, 'classic'),
        h('option', { value: 'quorum' }, 'quorum'))),
      field('Durable', h('input', { id: 'add-queue-durable', name: 'durable', type: 'checkbox', checked: true })),
      h('button', { type: 'submit' }, 'Add queue'),
      status);

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const vhost = form.elements.vhost.value;
      const name = form.elements.name.value.trim();
      const body = { durable: form.elements.durable.checked, auto_delete: false, arguments: {} };
      // Quorum queues are asked for the AMQP way, with x-queue-type.
      if (form.elements.type.value !== 'classic') body.arguments['x-queue-type'] = form.elements.type.value;
      setText(status, '');
      await act(async () => {
        const res = await api.put(queuePath(vhost, name), body);
        setText(status, res.status === 201 ? `Queue ${name} created.` : `Queue ${name} already exists.`);
        form.elements.name.value = '';
        await onAdded();
      });
    });
    return form;
  }

  // One label and value of a <dl class="stats">: <div><dt>label</dt><dd class=cls></dd></div>.
  function statItem(label, cls) {
    return h('div', null, h('dt', null, label), h('dd', { class: cls }));
  }

  // A label and its input, for the small forms.
  function field(label, input) {
    return h('label', { class: 'field' }, h('span', null, label), input);
  }

  function queueDetailView(root, [vhost, name]) {
    const path = queuePath(vhost, name);
    const fields = h('dl', { class: 'stats card' });
    const consumers = liveTable({
      key: (c) => `${c.channel_details ? c.channel_details.name : ''} ${c.consumer_tag}`,
      empty: 'No consumers.',
      columns: [
        textCol('Consumer tag', 'consumer-tag', (c) => c.consumer_tag),
        textCol('Channel', 'channel', (c) => c.channel_details && c.channel_details.name),
        textCol('User', 'user', (c) => c.channel_details && c.channel_details.user),
        textCol('Ack required', 'ack-required', (c) => fmtBool(c.ack_required)),
        textCol('Exclusive', 'exclusive', (c) => fmtBool(c.exclusive)),
        numCol('Prefetch', 'prefetch', (c) => fmtInt(c.prefetch_count)),
        textCol('Active', 'active', (c) => fmtBool(c.active)),
        textCol('Arguments', 'arguments', (c) => fmtJson(c.arguments)),
      ],
    });
    const bindings = liveTable({
      key: (b) => `${b.source}\n${b.properties_key}`,
      empty: 'No bindings.',
      columns: [
        textCol('From exchange', 'source', (b) => (b.source === '' ? '(default exchange)' : b.source)),
        textCol('Routing key', 'routing-key', (b) => b.routing_key),
        textCol('Arguments', 'arguments', (b) => fmtJson(b.arguments)),
      ],
    });

    const purge = h('button', { type: 'button', id: 'queue-purge', class: 'secondary' }, 'Purge messages');
    const remove = h('button', { type: 'button', id: 'queue-delete', class: 'danger' }, 'Delete queue');
    purge.addEventListener('click', () => {
      if (!confirm(`Purge every ready message of queue "${name}"?`)) return;
      act(async () => { await api.del(`${path}/contents`); await view.refresh(); });
    });
    remove.addEventListener('click', () => {
      if (!confirm(`Delete queue "${name}"?`)) return;
      act(async () => { await api.del(path); location.hash = '#/queues'; });
    });

    root.append(
      h('p', { class: 'crumbs' }, h('a', { href: '#/queues' }, 'Queues'), ' › vhost ', h('code', null, vhost)),
      h('h2', null, 'Queue ', h('span', { class: 'queue-name' }, name)),
      fields,
      h('div', { class: 'actions' }, purge, remove),
      h('h3', null, 'Consumers'), consumers.element,
      h('h3', null, 'Bindings'), bindings.element,
      h('div', { class: 'forms' }, publishForm(vhost, name, () => view.refresh()), getForm(vhost, name)));

    const view = {
      async refresh() {
        const [queue, queueBindings] = await Promise.all([api.get(path), api.get(`${path}/bindings`)]);
        renderQueueFields(fields, queue);
        consumers.update(queue.consumer_details || []);
        bindings.update(queueBindings);
      },
    };
    return view;
  }

  function renderQueueFields(dl, q) {
    const stats = q.message_stats;
    const rows = [
      ['Vhost', q.vhost],
      ['Type', q.type],
      ['State', q.state],
      ['Node', q.node],
      ['Durable', fmtBool(q.durable)],
      ['Auto-delete', fmtBool(q.auto_delete)],
      ['Exclusive', fmtBool(q.exclusive)],
      ['Arguments', fmtJson(q.arguments) || 'none'],
      ['Policy', q.policy, 'policy'],
      ['Operator policy', q.operator_policy, 'operator-policy'],
      ['Effective policy', fmtJson(q.effective_policy_definition) || 'none', 'effective-policy'],
      ['Ready', fmtInt(q.messages_ready), 'messages-ready'],
      ['Unacked', fmtInt(q.messages_unacknowledged), 'messages-unacked'],
      ['Total', fmtInt(q.messages), 'messages'],
      ['Ready bytes', fmtBytes(q.message_bytes_ready)],
      ['Consumers', fmtInt(q.consumers), 'consumers'],
      ['Oldest ready', fmtAge(q.oldest_ready_age_ms), 'oldest-ready'],
      ['Oldest unacked', fmtAge(q.oldest_unacked_age_ms), 'oldest-unacked'],
      ['Deliveries per message', fmtDeliveries(q.delivery_counts), 'delivery-counts'],
      ['Publish', fmtRate(rate(stats, 'publish'))],
      ['Deliver / get', fmtRate(rate(stats, 'deliver_get'))],
      ['Ack', fmtRate(rate(stats, 'ack'))],
      ['Idle since', q.idle_since],
    ];
    // Built once, then only the values change.
    if (dl.children.length !== rows.length) {
      dl.replaceChildren(...rows.map(([label, , cls]) => statItem(label, cls)));
    }
    rows.forEach(([, value], i) => setText(dl.children[i].lastChild, value || '–'));
  }

  function publishForm(vhost, name, onPublished) {
    const status = h('span', { class: 'form-status', role: 'status' });
    const form = h('form', { class: 'card', id: 'publish-form' },
      h('h3', null, 'Publish a message'),
      h('p', { class: 'muted' }, 'Through the default exchange, with this queue\'s name as the routing key.'),
      field('Delivery mode', h('select', { id: 'publish-delivery-mode', name: 'delivery_mode' },
        h('option', { value: '1' }, '1 – non-persistent'),
        h('option', { value: '2' }, '2 – persistent'))),
      field('Payload', h('textarea', { id: 'publish-payload', name: 'payload', rows: 4 })),
      h('button', { type: 'submit' }, 'Publish message'),
      status);

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      setText(status, '');
      await act(async () => {
        const res = await api.post(`/exchanges/${enc(vhost)}/amq.default/publish`, {
          routing_key: name,
          payload: form.elements.payload.value,
          payload_encoding: 'string',
          properties: { delivery_mode: Number(form.elements.delivery_mode.value) },
        });
        setText(status, res && res.routed === false ? 'Published, but not routed to any queue.' : 'Message published.');
        await onPublished();
      });
    });
    return form;
  }

  function getForm(vhost, name) {
    const results = h('div', { class: 'get-results', id: 'get-results' });
    const form = h('form', { class: 'card', id: 'get-form' },
      h('h3', null, 'Get messages'),
      h('p', { class: 'muted' }, 'Getting messages is destructive unless they are requeued.'),
      field('Ack mode', h('select', { id: 'get-ackmode', name: 'ackmode' },
        h('option', { value: 'reject_requeue_true' }, 'Nack, requeue'),
        h('option', { value: 'ack_requeue_false' }, 'Ack, remove from the queue'),
        h('option', { value: 'reject_requeue_false' }, 'Reject, do not requeue'),
        h('option', { value: 'ack_requeue_true' }, 'Ack, then requeue'))),
      field('Encoding', h('select', { id: 'get-encoding', name: 'encoding' },
        h('option', { value: 'auto' }, 'auto: string, or base64 if not UTF-8'),
        h('option', { value: 'base64' }, 'base64'))),
      field('Messages', h('input', { id: 'get-count', name: 'count', type: 'number', min: 1, value: '1' })),
      h('button', { type: 'submit' }, 'Get messages'),
      results);

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      results.replaceChildren();
      await act(async () => {
        const messages = await api.post(`${queuePath(vhost, name)}/get`, {
          count: Math.max(1, Number(form.elements.count.value) || 1),
          ackmode: form.elements.ackmode.value,
          encoding: form.elements.encoding.value,
          truncate: 50000,
        });
        renderMessages(results, messages || []);
      });
    });
    return form;
  }

  function renderMessages(container, messages) {
    if (messages.length === 0) {
      container.replaceChildren(h('p', { class: 'muted' }, 'The queue is empty.'));
      return;
    }
    container.replaceChildren(...messages.map((m, i) => h('div', { class: 'message' },
      h('div', { class: 'message-head' },
        `Message ${i + 1}`,
        h('span', { class: 'muted' },
          ` · routing key ${m.routing_key}`,
          m.exchange ? ` · exchange ${m.exchange}` : ' · default exchange',
          m.redelivered ? ' · redelivered' : '',
          typeof m.message_count === 'number' ? ` · ${m.message_count} left in the queue` : '')),
      h('dl', { class: 'fields compact' },
        h('dt', null, 'Properties'), h('dd', null, fmtJson(m.properties) || 'none'),
        h('dt', null, 'Payload'),
        h('dd', null, `${fmtInt(m.payload_bytes)} bytes, encoding ${m.payload_encoding}`)),
      h('pre', { class: 'payload' }, m.payload))));
  }

  // Policies and operator policies (/api/policies, /api/operator-policies):
  // both listed, each with a delete button, and one form that sets either.
  function policiesView(root) {
    const policyTable = (kind, id) => liveTable({
      key: (p) => `${p.vhost}/${p.name}`,
      rowAttrs: (p) => ({ 'data-vhost': p.vhost, 'data-policy': p.name }),
      empty: kind === 'policies' ? 'No policies.' : 'No operator policies.',
      columns: [
        textCol('Vhost', 'vhost', (p) => p.vhost),
        textCol('Name', 'name', (p) => p.name),
        textCol('Pattern', 'pattern', (p) => p.pattern),
        textCol('Apply to', 'apply-to', (p) => p['apply-to']),
        textCol('Definition', 'definition', (p) => fmtJson(p.definition)),
        numCol('Priority', 'priority', (p) => fmtInt(p.priority)),
        { head: '', cls: 'delete', render: (td, p) => deleteButton(td, kind, p) },
      ],
      id,
    });
    const policies = policyTable('policies', 'policies-table');
    const operatorPolicies = policyTable('operator-policies', 'operator-policies-table');
    root.append(
      h('h2', null, 'Policies'), policies.element,
      h('h2', null, 'Operator policies'), operatorPolicies.element,
      policyForm(() => view.refresh()));

    function deleteButton(td, kind, p) {
      if (td.firstChild) return;
      td.append(h('button', {
        type: 'button',
        class: 'secondary small',
        onclick: () => {
          if (!confirm(`Delete policy ${p.name} in vhost ${p.vhost}?`)) return;
          act(async () => { await api.del(`/${kind}/${enc(p.vhost)}/${enc(p.name)}`); await view.refresh(); });
        },
      }, 'Delete'));
    }

    const view = {
      async refresh() {
        // Operator policies are the administrator's; a policymaker sees
        // only the first table filled.
        const [own, operators] = await Promise.all([
          api.get('/policies'),
          api.get('/operator-policies').catch(() => []),
        ]);
        policies.update(own);
        operatorPolicies.update(operators);
      },
    };
    return view;
  }

  function policyForm(onSet) {
    const status = h('span', { class: 'form-status', role: 'status' });
    const form = h('form', { class: 'card inline-form', id: 'policy-form' },
      h('h3', null, 'Add or update a policy'),
      field('Kind', h('select', { id: 'policy-kind', name: 'kind' },
        h('option', { value: 'policies' }, 'policy'),
        h('option', { value: 'operator-policies' }, 'operator policy'))),
      field('Vhost', h('input', { id: 'policy-vhost', name: 'vhost', value: '/', required: true })),
      field('Name', h('input', { id: 'policy-name', name: 'name', required: true })),
      field('Pattern', h('input', { id: 'policy-pattern', name: 'pattern', required: true, placeholder: '^orders\\.' })),
      field('Apply to', h('select', { id: 'policy-apply-to', name: 'applyTo' },
        ...['all', 'queues', 'classic_queues', 'quorum_queues', 'exchanges'].map((v) => h('option', { value: v }, v)))),
      field('Priority', h('input', { id: 'policy-priority', name: 'priority', type: 'number', value: '0' })),
      field('Definition', h('textarea', {
        id: 'policy-definition', name: 'definition', rows: 3, required: true,
        placeholder: '{"max-length": 1000, "dead-letter-exchange": "dlx"}',
      })),
      h('button', { type: 'submit' }, 'Set policy'),
      status);

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      setText(status, '');
      let definition;
      try {
        definition = JSON.parse(form.elements.definition.value);
      } catch (err) {
        setText(status, `The definition is not JSON: ${err.message}`);
        return;
      }
      const kind = form.elements.kind.value;
      const name = form.elements.name.value.trim();
      await act(async () => {
        const res = await api.put(`/${kind}/${enc(form.elements.vhost.value)}/${enc(name)}`, {
          pattern: form.elements.pattern.value,
          'apply-to': form.elements.applyTo.value,
          priority: Number(form.elements.priority.value) || 0,
          definition,
        });
        setText(status, res.status === 201 ? `Policy ${name} created.` : `Policy ${name} updated.`);
        await onSet();
      });
    });
    return form;
  }

  function connectionsView(root) {
    const connections = liveTable({
      key: (c) => c.name,
      rowAttrs: (c) => ({ 'data-connection': c.name }),
      empty: 'No connections.',
      columns: [
        textCol('Name', 'name', (c) => c.name),
        textCol('User', 'user', (c) => c.user),
        textCol('Vhost', 'vhost', (c) => c.vhost),
        textCol('Protocol', 'protocol', (c) => c.protocol),
        textCol('Client', 'client', (c) => clientName(c.client_properties)),
        textCol('State', 'state', (c) => c.state),
        numCol('Channels', 'channels', (c) => fmtInt(c.channels)),
        textCol('Connected', 'connected-at', (c) => (c.connected_at ? new Date(c.connected_at).toLocaleString() : '')),
        { head: '', cls: 'close', render: (td, c) => closeButton(td, c.name) },
      ],
    });
    const channels = liveTable({
      key: (c) => c.name,
      rowAttrs: (c) => ({ 'data-channel': c.name }),
      empty: 'No channels.',
      columns: [
        textCol('Channel', 'name', (c) => c.name),
        textCol('User', 'user', (c) => c.user),
        textCol('Vhost', 'vhost', (c) => c.vhost),
        textCol('Mode', 'mode', (c) => [c.confirm && 'confirm', c.transactional && 'transactional'].filter(Boolean).join(', ')),
        numCol('Prefetch', 'prefetch', (c) => fmtInt(c.prefetch_count)),
        numCol('Consumers', 'consumers', (c) => fmtInt(c.consumer_count)),
        numCol('Unacked', 'messages-unacked', (c) => fmtInt(c.messages_unacknowledged)),
        textCol('State', 'state', (c) => c.state),
      ],
    });

    root.append(
      h('h2', null, 'Connections'), connections.element,
      h('h2', null, 'Channels'), channels.element);

    const view = {
      async refresh() {
        const [conns, chans] = await Promise.all([api.get('/connections'), api.get('/channels')]);
        connections.update(conns);
        channels.update(chans);
      },
    };

    function closeButton(td, connName) {
      if (td.firstChild) return;
      td.append(h('button', {
        type: 'button',
        class: 'secondary small',
        onclick: () => {
          if (!confirm(`Close connection ${connName}?`)) return;
          act(async () => { await api.del(`/connections/${enc(connName)}`); await view.refresh(); });
        },
      }, 'Close'));
    }
    return view;
  }

  // "product version" from AMQP client properties, e.g. "amqplib 2.3.1".
  function clientName(props) {
    if (!props) return '';
    return [props.product, props.version].filter((v) => typeof v === 'string').join(' ');
  }

  function modelsView(root) {
    const list = h('div', { class: 'models' });
    const emptyNote = h('p', { class: 'muted' }, 'No models: add a [[model]] to the configuration.');
    // Loads, switches and unloads, newest first, as published on the
    // amq.warren.model-events exchange.
    const events = liveTable({
      key: (e) => `${e.time_ms} ${e.event} ${e.model} ${e.version}`,
      rowAttrs: (e) => ({ 'data-event': e.event, 'data-model': e.model, 'data-version': e.version }),
      empty: 'No model events yet.',
      columns: [
        textCol('Time', 'time', (e) => new Date(e.time_ms).toLocaleTimeString()),
        textCol('Event', 'event', (e) => e.event),
        textCol('Model', 'model', (e) => e.model),
        textCol('Version', 'version', (e) => e.version),
        textCol('Details', 'details', (e) => eventDetails(e)),
      ],
    });
    root.append(h('h2', null, 'Models'), emptyNote, list,
      h('h2', null, 'Model events'), events.element);
    const cards = new Map(); // name@version -> {element, update(model, entry), destroy()}

    return {
      async refresh() {
        const [models, recent] = await Promise.all([api.get('/models'), api.get('/models/events')]);
        const seen = new Set();
        for (const model of models) {
          const key = modelKey(model);
          seen.add(key);
          const entry = recordModel(model);
          let card = cards.get(key);
          if (!card) {
            card = modelCard(model);
            cards.set(key, card);
            list.append(card.element);
            card.mountCharts();
          }
          card.update(model, entry);
        }
        for (const [key, card] of cards) {
          if (!seen.has(key)) { card.destroy(); cards.delete(key); }
        }
        emptyNote.hidden = models.length > 0;
        events.update(recent.slice().reverse());
      },
      destroy() { cards.forEach((c) => c.destroy()); },
    };
  }

  function eventDetails(e) {
    if (e.event === 'switched') return e.from ? `traffic from version ${e.from}` : 'first version serving';
    if (e.reason) return e.reason;
    return e.queue ? `queue ${e.queue}` : '';
  }

  function backendText(m) {
    if (m.backend == null) return 'loading';
    if (m.backend !== 'onnxruntime') return m.backend;
    const version = m.onnxruntime && m.onnxruntime.version;
    return version ? `ONNX Runtime ${version}` : 'ONNX Runtime';
  }

  function modelCard(model) {
    const stats = h('dl', { class: 'stats' },
      statItem('State', 'state'),
      statItem('Queue', 'queue'), statItem('Task', 'task'), statItem('Backend', 'backend'),
      statItem('Ready', 'ready'),
      statItem('Consumers', 'consumers'), statItem('Messages waiting', 'messages'),
      statItem('Requests', 'requests'), statItem('Replies', 'replies'),
      statItem('Poison', 'poison'), statItem('Failed batches', 'failed-batches'));
    const latencyBox = h('div', { class: 'chart model-latency' });
    const batchBox = h('div', { class: 'chart model-batch' });
    const title = h('h3', null, model.name);
    // tract is several times slower than ONNX Runtime on the same model:
    // a model that ended up on it says so, rather than being merely slow.
    const tractWarning = h('p', { class: 'backend-warning', hidden: true },
      'Runs on tract, several times slower than ONNX Runtime: ONNX Runtime\'s library was not ' +
      'loaded. Install it (pip install onnxruntime) or name it with onnxruntime_library ' +
      'in [model.runtime]; the broker log says where it looked.');
    const element = h('div', { class: 'card model', 'data-model': model.name, 'data-version': model.version },
      title, tractWarning, stats,
      h('div', { class: 'charts' },
        h('div', null, h('h4', null, 'Inference latency'), latencyBox),
        h('div', null, h('h4', null, 'Batch size'), batchBox)));
    let latency = null;
    let batch = null;
    const dd = (cls) => stats.querySelector(`dd.${cls}`);

    return {
      element,
      // Charts are created once the card is in the page, so they get its width.
      mountCharts() {
        latency = timeChart(latencyBox, [
          { label: 'p50', stroke: COLORS.blue },
          { label: 'p99', stroke: COLORS.red },
        ], ' ms');
        batch = timeChart(batchBox, [
          { label: 'p50', stroke: COLORS.purple },
          { label: 'mean (last interval)', stroke: COLORS.green },
        ]);
      },
      update(m, entry) {
        setText(title, m.version ? `${m.name} (version ${m.version})` : m.name);
        setText(dd('state'), m.state);
        setText(dd('queue'), m.queue);
        setText(dd('task'), m.task);
        setText(dd('backend'), backendText(m));
        tractWarning.hidden = m.backend !== 'tract';
        setText(dd('ready'), fmtBool(m.ready));
        setText(dd('consumers'), fmtInt(m.consumers));
        setText(dd('messages'), fmtInt(m.messages));
        setText(dd('requests'), fmtInt(m.requests));
        setText(dd('replies'), fmtInt(m.replies));
        setText(dd('poison'), fmtInt(m.poison));
        setText(dd('failed-batches'), fmtInt(m.failed_batches));
        latency.setData(entry.latency.data());
        batch.setData(entry.batch.data());
      },
      destroy() {
        if (latency) latency.destroy();
        if (batch) batch.destroy();
        element.remove();
      },
    };
  }

  function notFoundView(root) {
    root.append(h('h2', null, 'Not found'), h('p', null, h('a', { href: '#/overview' }, 'Back to the overview')));
    return {};
  }

  // ----------------------------------------------------------------- router

  // #/overview, #/queues, #/queues/<vhost>/<name>, #/connections, #/models,
  // #/policies;
  // segments are percent-encoded, so a vhost "/" is one segment, %2F.
  function route() {
    const segments = location.hash.replace(/^#\/?/, '').split('/').filter((s) => s !== '');
    let parts;
    try {
      parts = segments.map(decodeURIComponent);
    } catch {
      return { tab: '', mount: notFoundView, params: [] };
    }
    const [tab = 'overview', ...rest] = parts;
    if (tab === 'overview' && rest.length === 0) return { tab, mount: overviewView, params: [] };
    if (tab === 'queues' && rest.length === 0) return { tab, mount: queuesView, params: [] };
    if (tab === 'queues' && rest.length === 2) return { tab, mount: queueDetailView, params: rest };
    if (tab === 'connections' && rest.length === 0) return { tab, mount: connectionsView, params: [] };
    if (tab === 'models' && rest.length === 0) return { tab, mount: modelsView, params: [] };
    if (tab === 'policies' && rest.length === 0) return { tab, mount: policiesView, params: [] };
    return { tab: '', mount: notFoundView, params: [] };
  }

  let currentView = null;

  function showView() {
    if (!auth.get()) return;
    if (currentView && currentView.destroy) currentView.destroy();
    const { tab, mount, params } = route();
    for (const a of document.querySelectorAll('#tabs a')) {
      a.classList.toggle('active', a.dataset.tab === tab);
    }
    const root = $('view');
    root.replaceChildren();
    currentView = mount(root, params);
    pollNow();
  }

  // ------------------------------------------------------------------ polling

  // One poll at a time: each fetches /api/overview (header, overview charts)
  // and lets the current view refresh itself, then schedules the next.
  let pollTimer = null;
  let polling = false;
  let pollAgain = false;

  function pollNow() {
    clearTimeout(pollTimer);
    pollTimer = null;
    if (polling) { pollAgain = true; return; }
    polling = true;
    poll().finally(() => {
      polling = false;
      if (!auth.get()) return; // logged out (or a 401): stop until the next login
      if (pollAgain) { pollAgain = false; pollNow(); } else pollTimer = setTimeout(pollNow, POLL_MS);
    });
  }

  async function poll() {
    if (!auth.get()) return;
    const view = currentView;
    try {
      const overview = await api.get('/overview');
      recordOverview(overview);
      setText($('product-version'), overview.product_version ? `v${overview.product_version}` : '');
      // The user may have moved to another view while the request ran.
      if (view && view === currentView && view.refresh) await view.refresh(overview);
      if (bannerFromPoll) hideBanner();
    } catch (err) {
      // A view left behind (say, a queue just deleted) has nothing to report.
      if (view === currentView) showError(err, true);
    }
  }

  // ----------------------------------------------------------------- session

  function showLogin(message = '') {
    auth.clear();
    clearTimeout(pollTimer);
    if (currentView && currentView.destroy) currentView.destroy();
    currentView = null;
    $('view').replaceChildren();
    $('view').hidden = true;
    $('tabs').hidden = true;
    $('session').hidden = true;
    setText($('login-message'), message);
    $('login-message').hidden = !message;
    $('login').hidden = false;
    $('login-password').value = '';
    $('login-user').focus();
  }

  function showApp() {
    const creds = auth.get();
    $('login').hidden = true;
    $('view').hidden = false;
    $('tabs').hidden = false;
    $('session').hidden = false;
    setText($('session-user'), creds.user);
    showView();
  }

  async function login(event) {
    event.preventDefault();
    const user = $('login-user').value;
    const password = $('login-password').value;
    auth.set(user, password);
    try {
      // Checks the credentials before showing anything (a 401 comes back
      // to the login form through request()).
      await api.get('/whoami');
    } catch (err) {
      // request() has already brought the form back for a 401; say why here.
      auth.clear();
      setText($('login-message'), err.status === 401
        ? `Login failed: ${err.reason}.`
        : `Cannot log in: ${err.message}`);
      $('login-message').hidden = false;
      return;
    }
    hideBanner();
    if (!location.hash || location.hash === '#' || location.hash === '#/') {
      history.replaceState(null, '', '#/overview');
    }
    showApp();
  }

  function start() {
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', () => showLogin('Logged out.'));
    $('banner-close').addEventListener('click', hideBanner);
    window.addEventListener('hashchange', showView);
    if (auth.get()) showApp();
    else showLogin();
  }

  start();
})();
