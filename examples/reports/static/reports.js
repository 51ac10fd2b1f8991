// The example's page: submit a report, then follow its job's events (Tierline's SSE
// stream under /tierline) until it finishes. Everything shown goes in with textContent.
"use strict";
(() => {
  const API = "/tierline/v1/jobs";
  const list = document.getElementById("reports");

  function item(report) {
    const li = document.createElement("li");
    li.id = `report-${report.id}`;
    const title = document.createElement("strong");
    title.textContent = report.title;
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = report.status === "done" ? 1 : 0;
    const status = document.createElement("div");
    status.className = "meta status";
    li.append(title, bar, status);
    list.prepend(li);
    show(li, report);
    return li;
  }

  function show(li, report) {
    const status = li.querySelector(".status");
    if (report.status === "done") {
      li.querySelector("progress").value = 1;
      status.textContent = `done: total ${report.total}`;
      status.classList.add("done");
    } else {
      status.textContent = `queued (job ${report.job_id})`;
    }
  }

  function follow(li, report) {
    const stream = new EventSource(`${API}/${report.job_id}/events`);
    stream.addEventListener("progress", (e) => {
      const event = JSON.parse(e.data);
      const data = event.data || {};
      if (typeof data.fraction === "number") li.querySelector("progress").value = data.fraction;
      li.querySelector(".status").textContent = data.message || "running";
    });
    stream.addEventListener("started", () => {
      li.querySelector(".status").textContent = "started";
    });
    const finished = async (e) => {
      stream.close();
      if (e.type !== "succeeded") {
        li.querySelector(".status").textContent = `${e.type}`;
        return;
      }
      const res = await fetch(`/reports/${report.id}`);
      show(li, await res.json());
    };
    for (const type of ["succeeded", "failed", "cancelled"]) stream.addEventListener(type, finished);
  }

  document.getElementById("new").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = new FormData(e.target);
    const res = await fetch("/reports", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ title: form.get("title"), rows: Number(form.get("rows")) }),
    });
    if (!res.ok) {
      alert(`could not submit: ${res.status}`);
      return;
    }
    const report = await res.json();
    follow(item(report), report);
  });

  fetch("/reports")
    .then((res) => (res.ok ? res.json() : []))
    .then((reports) => {
      for (const report of reports.reverse()) {
        const li = item(report);
        if (report.status !== "done") follow(li, report);
      }
    });
})();
