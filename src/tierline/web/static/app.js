// Tierline dashboard: live counts and charts from the firehose (GET /v1/events), replicas
// and queues refreshed every few seconds (GET /v1/cluster, GET /v1/queues).
//
// The firehose is read with fetch() and a small SSE parser rather than EventSource, because
// EventSource cannot send an Authorization header: with API keys configured the same code
// path sends "Authorization: Bearer KEY" and no key ever appears in a URL (URLs end up in
// proxy logs and browser history). It resumes with Last-Event-ID after a disconnect, so the
// charts have no hole for a short outage. Everything the API returns is put in the page with
// textContent, never as HTML.
"use strict";

(() => {
  const REFRESH_MS = 3000; // replicas and queues: modest, one request each per period
  const FAILURES_MS = 15000; // recent failures, also refreshed soon after a "failed" event
  const BUCKET_MS = 2000; // chart resolution of the live series
  const WINDOW_MS = 5 * 60 * 1000; // charts show the last five minutes
  const MAX_TRACKED = 50000; // jobs remembered to pair start and finish events
  const KEY_STORE = "tierline.apiKey";
  const pageStart = Date.now();

  // -- small helpers ---------------------------------------------------------------------
  const $ = (sel) => document.querySelector(sel);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function fmtInt(n) {
    return n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US");
  }

  function fmtAge(s) {
    if (s === null || s === undefined) return "–";
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} m`;
  }

  function fmtDur(s) {
    if (s < 1) return `${+(s * 1000).toPrecision(3)} ms`;
    return `${s < 10 ? s.toFixed(2) : s.toFixed(1)} s`;
  }

  function fmtRate(v) {
    return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  function level(ratio, warn, bad) {
    return ratio >= bad ? "bad" : ratio >= warn ? "warn" : "ok";
  }

  function percentile(values, q) {
    if (!values.length) return null;
    const sorted = values.slice().sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  }

  function bar(ratio, lvl) {
    const outer = el("div", `bar ${lvl}`);
    const fill = el("div", "fill");
    fill.style.width = `${Math.max(0, Math.min(1, ratio)) * 100}%`; // CSSOM: allowed by CSP
    outer.append(fill);
    return outer;
  }

  // -- API access and the key ----------------------------------------------------------------
  class AuthError extends Error {}

  const auth = {
    get key() {
      return sessionStorage.getItem(KEY_STORE) || "";
    },
    headers(extra) {
      const h = { ...extra };
      if (this.key) h.Authorization = `Bearer ${this.key}`;
      return h;
    },
  };

  async function errorMessage(res) {
    try {
      const body = await res.json();
      return (body.error && body.error.message) || res.statusText;
    } catch {
      return res.statusText;
    }
  }

  // Where the API lives: "" at the root, or TIERLINE_WEB_API_PREFIX when the web tier
  // also serves an application (the server writes it into the page).
  const BASE = (document.querySelector('meta[name="tierline-base"]') || {}).content || "";

  async function api(path) {
    const res = await fetch(BASE + path, {
      headers: auth.headers({ Accept: "application/json" }),
      cache: "no-store",
    });
    if (res.status === 401 || res.status === 403) throw new AuthError(await errorMessage(res));
    if (!res.ok) throw new Error(`${path}: ${res.status} ${await errorMessage(res)}`);
    return res.json();
  }

  let keyWaiters = [];
  let needKey = false; // polling pauses until a key is given, rather than repeat 401s

  function askForKey(message) {
    needKey = true;
    $("#keyform").hidden = false;
    $("#key-msg").textContent = message || "";
  }

  function keyChanged() {
    const waiters = keyWaiters;
    keyWaiters = [];
    needKey = false;
    waiters.forEach((resolve) => resolve());
    sse.restart();
    refreshAll();
  }

  function setupKeyForm() {
    $("#key-button").addEventListener("click", () => {
      const form = $("#keyform");
      form.hidden = !form.hidden;
      if (!form.hidden) $("#key-input").focus();
    });
    $("#keyform").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("#key-input").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      $("#key-input").value = "";
      $("#key-msg").textContent = "";
      $("#keyform").hidden = true;
      keyChanged();
    });
    $("#key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      $("#key-msg").textContent = "key forgotten";
      keyChanged();
    });
  }

  function banner(text) {
    const b = $("#banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  // -- live series from the firehose ---------------------------------------------------------
  // Buckets keyed by start time (client clock) hold counts and latency samples.
  const buckets = new Map();
  const totals = { enqueued: 0, started: 0, succeeded: 0, retrying: 0, failed: 0, cancelled: 0 };
  const startedAt = new Map(); // job id -> [attempt, start time ms] (server clock)
  const dueAt = new Map(); // job id -> when it became due (server clock), for pickup delay
  let skew = null; // client clock minus server clock (upper bound: min seen lag)

  function remember(map, id, value) {
    map.delete(id);
    map.set(id, value);
    if (map.size > MAX_TRACKED) map.delete(map.keys().next().value);
  }

  function bucketFor(t) {
    const start = t - (t % BUCKET_MS);
    let b = buckets.get(start);
    if (!b) {
      b = { enqueued: 0, succeeded: 0, failed: 0, cancelled: 0, retrying: 0, run: [], pickup: [] };
      buckets.set(start, b);
    }
    return b;
  }

  function onJobEvent(type, ev) {
    if (!(type in totals)) return; // progress and log events: not counted
    const serverT = Date.parse(ev.at);
    if (Number.isNaN(serverT)) return;
    const lag = Date.now() - serverT;
    if (skew === null || lag < skew) skew = lag;
    const t = serverT + skew;
    totals[type] += 1;
    if (t < Date.now() - WINDOW_MS) return; // replayed after a long outage: too old to chart
    const b = bucketFor(t);
    const data = ev.data || {};
    if (type === "enqueued") {
      b.enqueued += 1;
      const due = Date.parse(data.run_at || ev.at);
      if (!Number.isNaN(due)) remember(dueAt, ev.job_id, due);
    } else if (type === "started") {
      remember(startedAt, ev.job_id, [data.attempt, serverT]);
      const due = dueAt.get(ev.job_id);
      if (due !== undefined) {
        b.pickup.push(Math.max(0, serverT - due) / 1000);
        dueAt.delete(ev.job_id);
      }
    } else {
      b[type] += 1;
      const started = startedAt.get(ev.job_id);
      if (started && (data.attempt === undefined || data.attempt === started[0])) {
        b.run.push(Math.max(0, serverT - started[1]) / 1000);
        startedAt.delete(ev.job_id);
      }
      if (type === "retrying" && data.run_at) {
        const due = Date.parse(data.run_at);
        if (!Number.isNaN(due)) remember(dueAt, ev.job_id, due);
      }
      if (type === "failed") failures.soon();
    }
  }

  function renderTotals() {
    for (const dd of document.querySelectorAll("#counts dd")) {
      dd.textContent = fmtInt(totals[dd.dataset.type]);
    }
  }

  // -- the firehose reader ---------------------------------------------------------------------
  function sseParser(dispatch) {
    let buf = "";
    let data = [];
    let type = "";
    let id = null;
    const eol = /\r\n|\r|\n/g;
    return (chunk) => {
      buf += chunk;
      let start = 0;
      for (;;) {
        eol.lastIndex = start;
        const m = eol.exec(buf);
        if (!m) break;
        if (m[0] === "\r" && m.index === buf.length - 1) break; // "\r\n" may be split
        const line = buf.slice(start, m.index);
        start = m.index + m[0].length;
        if (line === "") {
          if (data.length) dispatch(type || "message", data.join("\n"), id);
          data = [];
          type = "";
          continue;
        }
        if (line[0] === ":") continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value[0] === " ") value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") type = value;
        else if (field === "id") id = value;
      }
      buf = buf.slice(start);
    };
  }

  const sse = {
    lastId: null,
    controller: null,
    connected: false,
    restarting: false,
    restart() {
      if (this.connected) {
        this.restarting = true;
        this.controller.abort();
      }
    },
    setState(state, text) {
      const live = $("#live");
      live.className = `live ${state}`;
      live.textContent = text;
    },
    async run() {
      let delay = 1000;
      for (;;) {
        const controller = new AbortController();
        this.controller = controller;
        this.connected = true;
        try {
          const headers = auth.headers({ Accept: "text/event-stream" });
          if (this.lastId) headers["Last-Event-ID"] = this.lastId;
          const res = await fetch(BASE + "/v1/events", {
            headers,
            cache: "no-store",
            signal: controller.signal,
          });
          if (res.status === 401 || res.status === 403) {
            this.connected = false;
            const msg = await errorMessage(res);
            this.setState("off", "needs an API key");
            askForKey(msg);
            await new Promise((resolve) => keyWaiters.push(resolve));
            continue;
          }
          if (res.status === 400 && this.lastId) {
            this.lastId = null; // cannot resume there: start from now
            continue;
          }
          if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
          this.setState("on", "live");
          delay = 1000;
          const feed = sseParser((type, data, id) => {
            if (id) this.lastId = id;
            try {
              onJobEvent(type, JSON.parse(data));
            } catch (err) {
              if (!(err instanceof SyntaxError)) throw err;
            }
          });
          const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            feed(value);
          }
          this.setState("off", "stream ended; reconnecting");
        } catch (err) {
          if (this.restarting) {
            this.restarting = false;
            continue; // the key changed: reconnect at once
          }
          this.setState("off", `reconnecting (${err.message || err})`);
        } finally {
          this.connected = false;
        }
        await sleep(delay * (0.5 + Math.random()));
        delay = Math.min(delay * 2, 30000);
      }
    },
  };

  // -- charts ----------------------------------------------------------------------------------
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // The axis top: four grid steps, each a round number (6, 12, 18, 24 rather than 6.25...).
  function niceTop(v) {
    const step = v / 4;
    const exp = 10 ** Math.floor(Math.log10(step));
    const f = step / exp;
    const nice = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].find((n) => f <= n + 1e-9);
    return 4 * nice * exp;
  }

  const fmtAxis = (v) => (+v.toPrecision(3)).toLocaleString("en-US");

  class TimeChart {
    // series: [{ key, label, color: "--s1", line: false for legend only }]; gapMs: a longer
    // gap between points breaks the line (no data is not zero); fmt: legend values; axis:
    // axis labels.
    constructor(id, series, { fmt, axis, gapMs, minMax }) {
      this.fig = document.getElementById(id);
      this.canvas = this.fig.querySelector("canvas");
      this.series = series;
      this.fmt = fmt;
      this.axis = axis || fmtAxis;
      this.gapMs = gapMs;
      this.minMax = minMax || 1;
      this.points = new Map(series.map((s) => [s.key, []]));
      this.legend = new Map();
      const legend = this.fig.querySelector(".legend");
      for (const s of series) {
        const span = el("span", s.line === false ? "text" : s.color.slice(2));
        span.append(el("i"), el("b", null, s.label), document.createTextNode(" "));
        const value = el("span", "v", "–");
        span.append(value);
        legend.append(span);
        this.legend.set(s.key, value);
      }
    }

    set(key, pts) {
      this.points.set(key, pts);
    }

    push(key, t, v) {
      const pts = this.points.get(key);
      pts.push([t, v]);
      while (pts.length && pts[0][0] < t - WINDOW_MS - BUCKET_MS) pts.shift();
    }

    draw(now) {
      const c = this.canvas;
      const dpr = window.devicePixelRatio || 1;
      const w = c.clientWidth;
      const h = c.clientHeight;
      if (!w || !h) return;
      if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
        c.width = Math.round(w * dpr);
        c.height = Math.round(h * dpr);
      }
      const ctx = c.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, w, h);
      // The window grows from one minute to five as the page stays open, so a freshly
      // opened dashboard is not a thin line at the right edge.
      const span = Math.min(WINDOW_MS, Math.max(60000, now - pageStart));
      const t0 = now - span;
      let max = 0;
      let count = 0;
      let sum = 0;
      for (const s of this.series) {
        if (s.line === false) continue;
        for (const [t, v] of this.points.get(s.key)) {
          if (t >= t0 && v !== null) {
            max = Math.max(max, v);
            count += 1;
            sum += v;
          }
        }
      }
      const top = niceTop(Math.max(max, this.minMax));
      const left = 48;
      const right = 8;
      const topPad = 6;
      const bottom = 18;
      const pw = w - left - right;
      const ph = h - topPad - bottom;
      const x = (t) => left + ((t - t0) / span) * pw;
      const y = (v) => topPad + ph - (v / top) * ph;

      ctx.font = `11px ${css("--font") || "sans-serif"}`;
      ctx.lineWidth = 1;
      ctx.strokeStyle = css("--grid");
      ctx.fillStyle = css("--muted");
      ctx.textBaseline = "middle";
      ctx.textAlign = "right";
      for (let i = 0; i <= 4; i += 1) {
        const v = (top * i) / 4;
        const yy = Math.round(y(v)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(left, yy);
        ctx.lineTo(w - right, yy);
        ctx.stroke();
        ctx.fillText(this.axis(v), left - 6, yy);
      }
      ctx.textAlign = "center";
      ctx.textBaseline = "alphabetic";
      const step = span <= 90000 ? 15000 : span <= 180000 ? 30000 : 60000;
      for (let ago = Math.floor(span / step) * step; ago >= 0; ago -= step) {
        const xx = Math.min(Math.max(x(now - ago), left + 10), w - right - 12);
        const m = Math.floor(ago / 60000);
        const sec = Math.round((ago % 60000) / 1000);
        const label = ago === 0 ? "now" : `-${m ? `${m}m` : ""}${sec ? `${sec}s` : ""}`;
        ctx.fillText(label, xx, h - 4);
      }

      for (const s of this.series) {
        const pts = this.points.get(s.key).filter(([t, v]) => t >= t0 && v !== null);
        const last = pts.length ? pts[pts.length - 1][1] : null;
        this.legend.get(s.key).textContent = last === null ? "–" : this.fmt(last);
        if (s.line === false) continue;
        ctx.strokeStyle = css(s.color);
        ctx.fillStyle = ctx.strokeStyle;
        ctx.lineWidth = 1.75;
        ctx.lineJoin = "round";
        let run = [];
        const flush = () => {
          if (run.length === 1) {
            ctx.beginPath();
            ctx.arc(x(run[0][0]), y(run[0][1]), 2, 0, 2 * Math.PI);
            ctx.fill();
          } else if (run.length > 1) {
            ctx.beginPath();
            run.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
            ctx.stroke();
          }
          run = [];
        };
        for (const p of pts) {
          if (run.length && p[0] - run[run.length - 1][0] > this.gapMs) flush();
          run.push(p);
        }
        flush();
      }
      // For tests and curious operators: what is plotted, in numbers.
      this.fig.dataset.points = String(count);
      this.fig.dataset.sum = String(Math.round(sum * 1000) / 1000);
    }
  }

  const charts = {
    throughput: new TimeChart(
      "chart-throughput",
      [
        { key: "enqueued", label: "enqueued", color: "--s1" },
        { key: "succeeded", label: "succeeded", color: "--s5" },
        { key: "retrying", label: "retried", color: "--s4" },
        { key: "failed", label: "failed", color: "--s2" },
        { key: "cancelled", label: "cancelled", color: "--s3" },
      ],
      { fmt: fmtRate, gapMs: BUCKET_MS * 1.5, minMax: 1 },
    ),
    backlog: new TimeChart(
      "chart-backlog",
      [
        { key: "available", label: "available", color: "--s1" },
        { key: "running", label: "running", color: "--s5" },
        { key: "delayed", label: "scheduled+retrying", color: "--s4" },
      ],
      { fmt: fmtInt, gapMs: REFRESH_MS * 3.5, minMax: 4 },
    ),
    jobLatency: new TimeChart(
      "chart-joblatency",
      [
        { key: "pickup", label: "pickup p99", color: "--s3" },
        { key: "run50", label: "run p50", color: "--s5" },
        { key: "run99", label: "run p99", color: "--s4" },
      ],
      { fmt: fmtDur, axis: fmtDur, gapMs: BUCKET_MS * 1.5, minMax: 0.01 },
    ),
    webLatency: new TimeChart(
      "chart-weblatency",
      [
        { key: "p50", label: "p50", color: "--s5" },
        { key: "p99", label: "p99", color: "--s2" },
        { key: "rps", label: "req/s, all replicas", color: "--s1", line: false },
      ],
      { fmt: fmtRate, gapMs: REFRESH_MS * 3.5, minMax: 5 },
    ),
  };

  function updateLiveCharts(now) {
    const first = Math.max(now - WINDOW_MS, pageStart);
    // The last bucket shown ended a bucket ago: events reach the page a little after they
    // happen (batched writes, NOTIFY), and a bucket drawn too early would dip to zero.
    const last = now - (now % BUCKET_MS) - 2 * BUCKET_MS;
    for (const t of buckets.keys()) if (t < now - WINDOW_MS - BUCKET_MS) buckets.delete(t);
    const rate = (n) => n / (BUCKET_MS / 1000);
    const series = { enqueued: [], succeeded: [], retrying: [], failed: [], cancelled: [] };
    const pickup = [];
    const run50 = [];
    const run99 = [];
    for (let t = first - (first % BUCKET_MS); t <= last; t += BUCKET_MS) {
      const b = buckets.get(t);
      const mid = t + BUCKET_MS / 2;
      for (const key of Object.keys(series)) series[key].push([mid, b ? rate(b[key]) : 0]);
      if (b && b.pickup.length) pickup.push([mid, percentile(b.pickup, 0.99)]);
      if (b && b.run.length) {
        run50.push([mid, percentile(b.run, 0.5)]);
        run99.push([mid, percentile(b.run, 0.99)]);
      }
    }
    for (const [key, pts] of Object.entries(series)) charts.throughput.set(key, pts);
    charts.jobLatency.set("pickup", pickup);
    charts.jobLatency.set("run50", run50);
    charts.jobLatency.set("run99", run99);
  }

  function drawAll() {
    const now = Date.now();
    updateLiveCharts(now);
    for (const chart of Object.values(charts)) chart.draw(now);
    renderTotals();
  }

  // -- cluster: header chips and the replica table --------------------------------------------
  function setChip(id, text, lvl, ratio) {
    const chip = document.getElementById(id);
    chip.classList.remove("ok", "warn", "bad");
    if (lvl && lvl !== "ok") chip.classList.add(lvl);
    chip.querySelector(".value").textContent = text;
    const b = chip.querySelector(".bar");
    if (b) {
      b.className = `bar ${lvl || "ok"}`;
      b.querySelector(".fill").style.width = `${Math.max(0, Math.min(1, ratio || 0)) * 100}%`;
    }
  }

  function tierChip(id, t) {
    if (!t) return;
    const lvl = t.ready === 0 ? "bad" : t.ready < t.alive || t.dead > 0 ? "warn" : "ok";
    const dead = t.dead ? `, ${t.dead} dead` : "";
    setChip(id, `${t.ready}/${t.alive} ready${dead}`, lvl);
  }

  const STATUS_ORDER = { alive: 0, dead: 1, stopped: 2 };
  const MAX_STOPPED_SHOWN = 4;

  function poolCell(pool, r) {
    const cell = el("td");
    if (!pool || !pool.max) {
      cell.append(el("span", "muted", r.alive ? "no pool" : "–"));
      return cell;
    }
    const ratio = pool.in_use / pool.max;
    const lvl = level(ratio, 0.7, 0.9);
    const wrap = el("div", "cell-bar");
    const text = el("span", lvl === "ok" ? "" : lvl, `${pool.in_use}/${pool.max}`);
    if (pool.requested_max && pool.requested_max !== pool.max) {
      const capped = el("span", "warn", ` (asked ${pool.requested_max})`);
      capped.title = "The requested pool maximum was capped (CPU or budget): see the logs.";
      text.append(capped);
    }
    wrap.append(bar(ratio, lvl), text);
    cell.append(wrap);
    return cell;
  }

  function waitsCell(pool) {
    const cell = el("td");
    if (!pool) return cell;
    cell.append(el("span", pool.waiting > 0 ? "warn" : "", `${pool.waiting} waiting`));
    cell.append(document.createTextNode(" · "));
    cell.append(el("span", pool.timeouts > 0 ? "bad" : "", `${pool.timeouts} timeouts`));
    return cell;
  }

  function loadCell(r) {
    const cell = el("td");
    const s = r.stats || {};
    if (r.tier === "worker" && s.slots) {
      const total = s.slots.busy + s.slots.free;
      const ratio = total ? s.slots.busy / total : 0;
      const lvl = level(ratio, 0.8, 1);
      const wrap = el("div", "cell-bar");
      wrap.append(bar(ratio, lvl), el("span", "", `${s.slots.busy}/${total} slots busy`));
      cell.append(wrap);
    } else if (r.tier === "web" && s.http) {
      const h = s.http;
      cell.append(
        el("span", "", `${fmtRate(h.rps)} req/s · p50 ${h.p50_ms} ms · `),
        el("span", h.p99_ms >= 500 ? "bad" : h.p99_ms >= 100 ? "warn" : "", `p99 ${h.p99_ms} ms`),
      );
      if (h.errors) cell.append(el("span", "bad", ` · ${h.errors} 5xx`));
      if (s.sse_streams !== undefined) {
        const n = s.sse_streams;
        cell.append(el("span", "", ` · ${n} ${n === 1 ? "stream" : "streams"}`));
      }
    } else {
      cell.append(el("span", "muted", "–"));
    }
    return cell;
  }

  function renderReplicas(cluster) {
    const body = $("#replicas tbody");
    const rows = cluster.replicas.slice().sort(
      (a, b) =>
        a.tier.localeCompare(b.tier) ||
        STATUS_ORDER[a.status] - STATUS_ORDER[b.status] ||
        (a.status === "stopped"
          ? b.started_at.localeCompare(a.started_at)
          : a.started_at.localeCompare(b.started_at)),
    );
    const stopped = rows.filter((r) => r.status === "stopped");
    const shown = rows.filter((r) => r.status !== "stopped").concat(stopped.slice(0, MAX_STOPPED_SHOWN));
    const frag = document.createDocumentFragment();
    for (const r of shown) {
      const tr = el("tr", r.status);
      tr.dataset.tier = r.tier;
      tr.dataset.status = r.status;
      tr.append(el("td", "", r.tier));
      const who = el("td");
      who.append(el("span", "", `${r.host}:${r.pid} `), el("span", "mono muted", r.id.slice(0, 8)));
      who.title = r.id;
      tr.append(who);
      const st = el("td");
      st.append(el("span", `badge ${r.status}`, r.status));
      tr.append(st);
      const ready = el("td");
      if (r.status !== "alive") ready.append(el("span", "muted", "–"));
      else if (r.ready) ready.append(el("span", "ok", "ready"));
      else ready.append(el("span", "reason", "not ready"));
      tr.append(ready);
      const hb = el("td", r.status === "dead" ? "bad" : "", `${fmtAge(r.heartbeat_age_s)} ago`);
      tr.append(hb);
      const pool = (r.stats || {}).pool;
      const cells = [poolCell(pool, r), waitsCell(pool), loadCell(r)];
      if (r.status !== "alive") cells.forEach((c) => c.classList.add("stale"));
      tr.append(...cells, el("td", "muted", r.version));
      frag.append(tr);
      if (r.status === "alive" && !r.ready) {
        // The reason gets a line of its own: it is long, and it is what the operator needs.
        const why = el("tr", "why");
        why.dataset.tier = r.tier;
        const td = el("td", "reason", `↳ ${r.reason || "not ready (no reason given)"}`);
        td.colSpan = 9;
        why.append(td);
        frag.append(why);
      }
    }
    if (!shown.length) {
      const tr = el("tr");
      const td = el("td", "empty", "no replicas registered");
      td.colSpan = 9;
      tr.append(td);
      frag.append(tr);
    }
    body.replaceChildren(frag);
    const hidden = stopped.length - Math.min(stopped.length, MAX_STOPPED_SHOWN);
    const alive = rows.filter((r) => r.status === "alive").length;
    $("#replica-count").textContent =
      `${alive} alive` + (hidden > 0 ? ` · ${hidden} more stopped in the last hour` : "");
  }

  // The read replica (TIERLINE_DATABASE_READ_URL): its own budget and server, and where
  // the answering web replica's reads go; hidden without one.
  function renderReadReplica(rr) {
    for (const id of ["chip-read-budget", "chip-read-server", "chip-read-lag"]) {
      document.getElementById(id).hidden = !rr;
    }
    if (!rr) return;
    const b = rr.budget || {};
    if (b.total) {
      const ratio = b.claimed / b.total;
      setChip("chip-read-budget", `${b.claimed}/${b.total}`, level(ratio, 0.75, 0.9), ratio);
      document.getElementById("chip-read-budget").title =
        `Read replica's connection budget: ${b.source || ""}`;
    }
    const srv = rr.server || {};
    if (srv.max_connections) {
      const ratio = (srv.connections || 0) / srv.max_connections;
      setChip(
        "chip-read-server",
        `${srv.connections}/${srv.max_connections}`,
        level(ratio, 0.7, 0.8),
        ratio,
      );
    } else {
      setChip("chip-read-server", "down", "bad", 0);
    }
    const r = rr.routing || {};
    const lag = r.lag_s === null || r.lag_s === undefined ? "?" : `${r.lag_s.toFixed(1)} s`;
    setChip("chip-read-lag", `${r.target} · lag ${lag}`, r.target === "replica" ? "ok" : "warn");
    document.getElementById("chip-read-lag").title =
      r.reason || `Reads on the replica; they move to the primary above ${r.max_lag_s} s of lag`;
  }

  function renderCluster(cluster, now) {
    tierChip("chip-web", cluster.tiers.web);
    tierChip("chip-worker", cluster.tiers.worker);
    const b = cluster.budget || {};
    if (b.total) {
      const ratio = b.claimed / b.total;
      setChip("chip-budget", `${b.claimed}/${b.total}`, level(ratio, 0.75, 0.9), ratio);
      document.getElementById("chip-budget").title = `Connection budget: ${b.source || ""}`;
    }
    const srv = cluster.server || {};
    if (srv.max_connections) {
      const ratio = (srv.connections || 0) / srv.max_connections;
      setChip(
        "chip-server",
        `${srv.connections}/${srv.max_connections}`,
        level(ratio, 0.7, 0.8),
        ratio,
      );
    }
    renderReadReplica(cluster.read_replica);
    renderReplicas(cluster);
    // Web latency: the worst live replica (an incident shows on one replica first).
    const web = cluster.replicas.filter((r) => r.tier === "web" && r.alive && r.stats && r.stats.http);
    if (web.length) {
      charts.webLatency.push("p50", now, Math.max(...web.map((r) => r.stats.http.p50_ms)));
      charts.webLatency.push("p99", now, Math.max(...web.map((r) => r.stats.http.p99_ms)));
      charts.webLatency.push("rps", now, web.reduce((n, r) => n + r.stats.http.rps, 0));
    }
  }

  // -- queues ------------------------------------------------------------------------------------
  // The operator's column: what holds the queue back (paused, unserved, limits) and the
  // buttons that act on it (ops.js handles the clicks; they need the admin scope).
  function controlCell(q) {
    const td = el("td", "control");
    if (q.paused) td.append(el("span", "badge bad", "paused"));
    if (q.unserved) {
      const b = el("span", "badge warn", "no worker");
      b.title = "Jobs wait here but no live worker serves this queue (TIERLINE_WORKER_QUEUES)";
      td.append(b);
    }
    if (q.max_running !== null && q.max_running !== undefined) {
      td.append(el("span", "badge", `max ${q.max_running}`));
    }
    if (q.rate_limit) td.append(el("span", "badge", q.rate_limit));
    if (q.partition_by) td.append(el("span", "badge", `per ${q.partition_by}`));
    const toggle = el("button", "act", q.paused ? "Resume" : "Pause");
    toggle.type = "button";
    toggle.dataset.action = q.paused ? "resume" : "pause";
    toggle.dataset.queue = q.queue;
    td.append(toggle);
    if (q.counts.failed > 0) {
      const retry = el("button", "act", "Retry failed");
      retry.type = "button";
      retry.dataset.action = "retry-failed";
      retry.dataset.queue = q.queue;
      td.append(retry);
    }
    return td;
  }

  function renderQueues(data, now) {
    const body = $("#queues tbody");
    const frag = document.createDocumentFragment();
    let available = 0;
    let running = 0;
    let delayed = 0;
    let oldest = null;
    for (const q of data.queues) {
      const c = q.counts;
      available += c.available;
      running += c.running;
      delayed += c.scheduled + c.retrying;
      const age = q.oldest_available_age_s;
      if (age !== null && (oldest === null || age > oldest)) oldest = age;
      const tr = el("tr");
      tr.dataset.queue = q.queue;
      tr.append(el("td", "", q.queue));
      for (const state of ["available", "running", "scheduled", "retrying"]) {
        tr.append(el("td", "num", fmtInt(c[state])));
      }
      const ageLevel = age === null ? "" : level(age, 60, 300);
      tr.append(el("td", `num ${ageLevel === "ok" ? "" : ageLevel}`, fmtAge(age)));
      tr.append(el("td", "num", fmtRate(q.throughput_per_s["1m"])));
      tr.append(el("td", "num", fmtInt(c.succeeded)));
      const failed = el("td", "num", fmtInt(c.failed));
      if (q.failed_15m) {
        failed.append(el("span", "bad", ` (${fmtInt(q.failed_15m)} in 15 m)`));
      }
      tr.append(failed);
      tr.append(el("td", "num", fmtInt(c.cancelled)));
      tr.append(controlCell(q));
      frag.append(tr);
    }
    if (!data.queues.length) {
      const tr = el("tr");
      const td = el("td", "empty", "no jobs yet");
      td.colSpan = 11;
      tr.append(td);
      frag.append(tr);
    }
    body.replaceChildren(frag);
    charts.backlog.push("available", now, available);
    charts.backlog.push("running", now, running);
    charts.backlog.push("delayed", now, delayed);
    setChip("chip-backlog", fmtInt(available), available > 0 && oldest > 60 ? "warn" : "ok");
    setChip("chip-oldest", fmtAge(oldest), oldest === null ? "ok" : level(oldest, 60, 300));
  }

  // -- recent failures ---------------------------------------------------------------------------
  const failures = {
    timer: null,
    soon() {
      if (!this.timer) this.timer = setTimeout(() => this.refresh(), 2000);
    },
    async refresh() {
      clearTimeout(this.timer);
      this.timer = null;
      try {
        const data = await api("/v1/jobs?state=failed&limit=10");
        this.render(data.jobs);
      } catch (err) {
        if (err instanceof AuthError) askForKey(err.message);
      }
    },
    render(jobs) {
      const body = $("#failures tbody");
      const frag = document.createDocumentFragment();
      const sorted = jobs.slice().sort((a, b) => (b.finished_at || "").localeCompare(a.finished_at || ""));
      for (const j of sorted) {
        const tr = el("tr");
        tr.append(el("td", "", j.finished_at ? new Date(j.finished_at).toLocaleTimeString() : "–"));
        tr.append(el("td", "mono", `#${j.id}`));
        tr.append(el("td", "", j.kind));
        tr.append(el("td", "", j.queue));
        tr.append(el("td", "num", `${j.attempt}/${j.max_attempts}`));
        const err = j.error || {};
        const text = `${err.type || "error"}: ${String(err.message || "").split("\n")[0]}`;
        const td = el("td", "error-text", text.length > 240 ? `${text.slice(0, 240)}…` : text);
        if (err.traceback) td.title = err.traceback;
        tr.append(td);
        frag.append(tr);
      }
      if (!jobs.length) {
        const tr = el("tr");
        const td = el("td", "empty", "no failed jobs");
        td.colSpan = 6;
        tr.append(td);
        frag.append(tr);
      }
      body.replaceChildren(frag);
    },
  };

  // -- periodic refresh ----------------------------------------------------------------------------
  let lastOk = null;
  let refreshing = false;

  async function refreshAll() {
    if (refreshing) return;
    refreshing = true;
    try {
      const [cluster, queues] = await Promise.allSettled([api("/v1/cluster"), api("/v1/queues")]);
      const now = Date.now();
      const errors = [cluster, queues].filter((r) => r.status === "rejected").map((r) => r.reason);
      if (cluster.status === "fulfilled") renderCluster(cluster.value, now);
      if (queues.status === "fulfilled") renderQueues(queues.value, now);
      const authErr = errors.find((e) => e instanceof AuthError);
      if (authErr) {
        askForKey(authErr.message);
        banner("This web tier requires an API key with the read scope.");
      } else if (errors.length) {
        const since = lastOk ? ` (last update ${new Date(lastOk).toLocaleTimeString()})` : "";
        banner(`API unavailable: ${errors[0].message || errors[0]}${since}`);
      } else {
        banner("");
        lastOk = now;
        document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
        $("#refreshed").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
      }
      const alarm = document.querySelector(".chip.bad") !== null;
      document.title = alarm ? "(!) Tierline" : "Tierline";
    } finally {
      refreshing = false;
    }
  }

  async function pollForever(fn, ms) {
    for (;;) {
      if (!document.hidden && !needKey) await fn(); // background tabs do not poll
      await sleep(ms);
    }
  }

  // What ops.js (the operator's panels) shares with this file.
  window.Tierline = { $, el, fmtInt, fmtAge, api, auth, errorMessage, AuthError, BASE, sseParser,
    askForKey, refreshAll: () => refreshAll() };

  function main() {
    setupKeyForm();
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refreshAll();
    });
    pollForever(refreshAll, REFRESH_MS);
    pollForever(() => failures.refresh(), FAILURES_MS);
    sse.run();
    setInterval(drawAll, 1000);
    window.addEventListener("resize", drawAll);
    drawAll();
  }

  main();
})();
