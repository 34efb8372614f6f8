// Cordon's console: live audit events (server-sent events) and TTL countdowns. Text only: every value
// goes in through textContent, never as markup.
"use strict";

function countdowns() {
  const now = Date.now() / 1000;
  for (const el of document.querySelectorAll(".countdown[data-expires]")) {
    const left = Math.max(0, Number(el.dataset.expires) - now);
    const h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = Math.floor(left % 60);
    el.textContent = left <= 0 ? "expired" : `${h ? h + "h " : ""}${m}m ${s}s left`;
  }
}

function live() {
  const table = document.getElementById("live");
  if (!table) return;
  const tailnet = table.dataset.tailnet || "";
  const source = new EventSource("/events?tailnet=" + encodeURIComponent(tailnet));
  source.addEventListener("open", () => { table.dataset.connected = "yes"; });
  source.addEventListener("audit", (message) => {
    const e = JSON.parse(message.data);
    const row = document.createElement("tr");
    for (const value of [e.time, e.kind, e.actor, e.summary]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    }
    table.tBodies[0].prepend(row);
  });
  source.addEventListener("end", () => source.close());
}

document.addEventListener("DOMContentLoaded", () => {
  countdowns();
  setInterval(countdowns, 1000);
  live();
});
