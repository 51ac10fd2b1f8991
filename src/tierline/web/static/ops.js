// Tierline dashboard, the operator's panels: the job list (filters, keyset paging), a job's
// page (args, attempts, error and traceback, the events timeline from its SSE stream, live
// progress), and the actions: retry and cancel a job, pause/resume a queue, retry a queue's
// failed jobs. Actions need the admin scope when API keys are set; a refusal is shown as the
// API words it. Like app.js, everything from the API goes in with textContent.
"use strict";

(() => {
  const T = window.Tierline;
  const { $, el, fmtInt } = T;
  const PAGE = 25;

  async function send(method, path, body) {
    const headers = T.auth.headers({ Accept: "application/json" });
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(T.BASE + path, {
      method,
      headers,
      cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!res.ok) throw new Error(`${res.status}: ${await T.errorMessage(res)}`);
    return res.json();
  }

  function say(text, bad) {
    const box = $("#action-msg");
    box.hidden = !text;
    box.textContent = text || "";
    box.className = `actionmsg ${bad ? "bad" : "ok"}`;
    box.dataset.result = bad ? "refused" : "done";
  }

  async function act(label, call) {
    try {
      const out = await call();
      say(`${label}: done`, false);
      T.refreshAll();
      jobs.load();
      return out;
    } catch (err) {
      say(`${label}: ${err.message}`, true);
      return null;
    }
  }

  // -- the job list ------------------------------------------------------------------------------
  const jobs = {
    cursors: [], // the cursor of each page shown so far ("" for the first)
    next: null,
    async load(cursor) {
      if (cursor !== undefined) this.cursors.push(cursor);
      const at = this.cursors.length ? this.cursors[this.cursors.length - 1] : "";
      const q = new URLSearchParams({ limit: String(PAGE) });
      for (const name of ["queue", "state", "kind"]) {
        const v = $(`#f-${name}`).value.trim();
        if (v) q.set(name, v);
      }
      if (at) q.set("cursor", at);
      try {
        const data = await T.api(`/v1/jobs?${q}`);
        this.next = data.next_cursor;
        this.render(data.jobs);
      } catch (err) {
        if (err instanceof T.AuthError) T.askForKey(err.message);
        else say(`jobs: ${err.message}`, true);
      }
    },
    render(list) {
      const frag = document.createDocumentFragment();
      for (const j of list) {
        const tr = el("tr", "clickable");
        tr.dataset.job = String(j.id);
        tr.dataset.state = j.state;
        tr.append(el("td", "mono", `#${j.id}`), el("td", "", j.kind), el("td", "", j.queue));
        tr.append(el("td", `state-${j.state}`, j.state));
        tr.append(el("td", "num", `${j.attempt}/${j.max_attempts}`));
        tr.append(el("td", "", new Date(j.created_at).toLocaleTimeString()));
        const p = j.progress;
        tr.append(el("td", "", p && typeof p.fraction === "number" ? `${Math.round(p.fraction * 100)} %` : ""));
        frag.append(tr);
      }
      if (!list.length) {
        const tr = el("tr");
        const td = el("td", "empty", "no jobs match");
        td.colSpan = 7;
        tr.append(td);
        frag.append(tr);
      }
      $("#jobs tbody").replaceChildren(frag);
      $("#jobs-next").disabled = !this.next;
      $("#jobs-page").textContent = `page ${Math.max(1, this.cursors.length)}`;
    },
  };

  // -- one job's page ------------------------------------------------------------------------------
  const page = {
    id: null,
    controller: null,
    timer: null,
    open(id) {
      this.close();
      this.id = id;
      $("#job").hidden = false;
      $("#job-id").textContent = `#${id}`;
      $("#job-events").replaceChildren();
      this.refresh();
      this.timer = setInterval(() => this.refresh(), 1000);
      this.follow(id);
      $("#job").scrollIntoView({ block: "nearest" });
    },
    close() {
      if (this.controller) this.controller.abort();
      clearInterval(this.timer);
      this.controller = null;
      this.id = null;
      $("#job").hidden = true;
    },
    async refresh() {
      if (this.id === null) return;
      try {
        this.render(await T.api(`/v1/jobs/${this.id}`));
      } catch (err) {
        say(`job ${this.id}: ${err.message}`, true);
      }
    },
    render(j) {
      const state = $("#job-state");
      state.textContent = j.state;
      state.className = `badge state-${j.state}`;
      $("#job").dataset.state = j.state;
      const finished = ["succeeded", "failed", "cancelled"].includes(j.state);
      $("#job-retry").disabled = !finished;
      $("#job-cancel").disabled = finished;
      const p = j.progress || {};
      $("#job-progress").value = typeof p.fraction === "number" ? p.fraction : finished ? 1 : 0;
      $("#job-progress-text").textContent = p.message || "";
      const facts = [
        ["kind", j.kind], ["queue", j.queue], ["attempt", `${j.attempt} of ${j.max_attempts}`],
        ["priority", j.priority], ["created", j.created_at], ["run at", j.run_at],
        ["started", j.started_at || "–"], ["finished", j.finished_at || "–"],
        ["idempotency key", j.idempotency_key || "–"],
        ["result", j.result === null || j.result === undefined ? "–" : JSON.stringify(j.result)],
      ];
      const dl = document.createDocumentFragment();
      for (const [k, v] of facts) {
        const div = el("div");
        div.append(el("dt", "", k), el("dd", "", v));
        dl.append(div);
      }
      $("#job-facts").replaceChildren(dl);
      $("#job-args").textContent = JSON.stringify(j.args, null, 2);
      const e = j.error;
      $("#job-error").textContent = e
        ? `${e.type || "error"} (attempt ${e.attempt ?? "?"}): ${e.message || ""}\n\n${e.traceback || ""}`
        : "–";
    },
    async follow(id) {
      const controller = new AbortController();
      this.controller = controller;
      const list = $("#job-events");
      let lastSeq = null;
      const parse = T.sseParser((type, data) => {
        if (type !== "job" && type !== "message" && !data.startsWith("{")) return;
        let ev;
        try {
          ev = JSON.parse(data);
        } catch {
          return;
        }
        if (!ev || !ev.type) return;
        if (lastSeq !== null && ev.seq <= lastSeq) return;
        lastSeq = ev.seq;
        const li = el("li", `ev-${ev.type}`);
        li.dataset.type = ev.type;
        const info = ev.data || {};
        const detail = info.message || (info.error && info.error.message) || (info.attempt ? `attempt ${info.attempt}` : "");
        li.append(el("span", "mono", `#${ev.seq}`), el("span", "", ` ${ev.type} `));
        li.append(el("span", "muted", `${ev.at ? new Date(ev.at).toLocaleTimeString() : ""} ${detail}`));
        list.append(li);
        if (ev.type === "progress") this.refresh();
      });
      // A finished job's stream ends after its last event; a retry or a new attempt
      // continues it, so the page reconnects from the last seq while it shows the job.
      while (this.id === id && !controller.signal.aborted) {
        try {
          const headers = T.auth.headers({ Accept: "text/event-stream" });
          if (lastSeq !== null) headers["Last-Event-ID"] = String(lastSeq);
          const res = await fetch(`${T.BASE}/v1/jobs/${id}/events`, {
            headers,
            cache: "no-store",
            signal: controller.signal,
          });
          if (res.ok && res.body) {
            const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
            for (;;) {
              const { value, done } = await reader.read();
              if (done) break;
              parse(value);
            }
          }
        } catch {
          // closed or aborted: the timeline keeps what arrived
        }
        if (this.id === id) this.refresh();
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    },
  };

  // -- schedules -----------------------------------------------------------------------------------
  async function loadSchedules() {
    let data;
    try {
      data = await T.api("/v1/schedules");
    } catch {
      return;
    }
    const frag = document.createDocumentFragment();
    for (const s of data.schedules) {
      const tr = el("tr");
      tr.dataset.schedule = s.name;
      const when = (t) => (t ? new Date(t).toLocaleString() : "–");
      tr.append(el("td", "", s.name), el("td", "", s.kind), el("td", "mono", s.spec));
      tr.append(el("td", "", s.timezone), el("td", "", s.catch_up ? "one run" : "none"));
      tr.append(el("td", "", when(s.last_slot)));
      tr.append(el("td", "", s.last_job_id ? `#${s.last_job_id} ${s.last_job_state || ""}` : "–"));
      tr.append(el("td", "", when(s.next_run)));
      frag.append(tr);
    }
    if (!data.schedules.length) {
      const tr = el("tr");
      const td = el("td", "empty", "no schedules");
      td.colSpan = 8;
      tr.append(td);
      frag.append(tr);
    }
    $("#schedules tbody").replaceChildren(frag);
  }

  // -- wiring --------------------------------------------------------------------------------------
  function wire() {
    $("#job-filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      jobs.cursors = [];
      jobs.load("");
    });
    $("#jobs-first").addEventListener("click", () => {
      jobs.cursors = [];
      jobs.load("");
    });
    $("#jobs-next").addEventListener("click", () => {
      if (jobs.next) jobs.load(jobs.next);
    });
    $("#jobs tbody").addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr[data-job]");
      if (tr) page.open(Number(tr.dataset.job));
    });
    $("#job-close").addEventListener("click", () => page.close());
    $("#job-retry").addEventListener("click", () =>
      act(`retry #${page.id}`, () => send("POST", `/v1/jobs/${page.id}/retry`)).then(() => page.refresh()));
    $("#job-cancel").addEventListener("click", () =>
      act(`cancel #${page.id}`, () => send("POST", `/v1/jobs/${page.id}/cancel`)).then(() => page.refresh()));
    $("#queues tbody").addEventListener("click", (ev) => {
      const b = ev.target.closest("button[data-action]");
      if (!b) return;
      const q = b.dataset.queue;
      const path = `/v1/queues/${encodeURIComponent(q)}`;
      if (b.dataset.action === "pause") act(`pause ${q}`, () => send("PATCH", path, { paused: true }));
      if (b.dataset.action === "resume") act(`resume ${q}`, () => send("PATCH", path, { paused: false }));
      if (b.dataset.action === "retry-failed") {
        act(`retry failed jobs of ${q}`, () => send("POST", `${path}/retry-failed`));
      }
    });
  }

  wire();
  jobs.load("");
  loadSchedules();
  setInterval(() => {
    if (!document.hidden) {
      jobs.load();
      loadSchedules();
    }
  }, 5000);
})();
