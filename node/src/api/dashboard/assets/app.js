// The node's dashboard: logs in with an API token, then draws the page the
// address names (#/node, #/alliance, #/jobs, #/jobs/ID, #/trust) from the
// node's /v1 routes, again every POLL_MS.
//
// Every element is made with the DOM's own calls and text goes in as text:
// names come from other users and other institutions.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "alliance.token";
const SVG = "http://www.w3.org/2000/svg";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  me: null,
  status: null,
  timer: null,
  // What the page was last drawn from: an unchanged answer is not redrawn.
  drawn: null,
};

// ---- talking to the node ----

class ApiError extends Error {
  constructor(status, message, hint) {
    super(message);
    this.status = status;
    this.hint = hint || "";
  }
}

async function api(method, path) {
  let r;
  try {
    r = await fetch(path, {
      method,
      headers: { Authorization: "Bearer " + state.token },
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, "the node does not answer", "is it running? the page retries by itself");
  }
  const json = (r.headers.get("content-type") || "").includes("json");
  const body = json ? await r.json() : await r.text();
  if (!r.ok) {
    const err = (json && body && body.error) || {};
    throw new ApiError(r.status, err.message || r.statusText, err.hint);
  }
  return body;
}

const get = (path) => api("GET", path);

// ---- making elements ----

function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  append(e, children);
  return e;
}

function s(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  setAttrs(e, attrs);
  append(e, children);
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(e, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

const card = (title, ...body) => h("div", { class: "card" }, title ? h("h2", {}, title) : null, body);

function table(headers, rows, attrs) {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => (typeof x === "string" ? h("th", {}, x) : h("th", { class: x.cls }, x.text))))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "none"))),
  );
}

const badge = (text, cls) => h("span", { class: "badge " + (cls || text) }, text);
const num = (v, attrs) => h("td", Object.assign({ class: "num" }, attrs), v);
const short = (id) => h("span", { class: "mono", title: id }, id.length > 16 ? id.slice(0, 8) + "…" + id.slice(-6) : id);

function dl(pairs) {
  return h("dl", {}, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v === "" || v === undefined ? "—" : v)]));
}

function tiles(pairs) {
  return h("div", { class: "tiles" }, pairs.map(([k, v, id]) => h("div", { class: "tile", id }, h("div", { class: "n" }, v), h("div", { class: "k" }, k))));
}

// ---- numbers people read ----

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function duration(us) {
  const secs = us / 1e6;
  if (secs < 1) return (us / 1000).toFixed(1) + " ms";
  if (secs < 120) return secs.toFixed(1) + " s";
  if (secs < 7200) return (secs / 60).toFixed(1) + " min";
  return (secs / 3600).toFixed(1) + " h";
}

const when = (secs) => (secs ? new Date(secs * 1000).toLocaleString() : "");
const clock = (ms, seconds) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: seconds ? "2-digit" : undefined });
const roles = () => (state.status ? state.status.roles.split(",") : []);

// ---- charts (plain SVG) ----

// Charts are drawn at the page's width, so their text is the page's size.
const chartWidth = () => Math.max(480, ($("page").clientWidth || 800) - 70);

// The alliance's GPUs by state over time, stacked.
function capacityChart(history) {
  const W = chartWidth(), H = 200, L = 36, R = 10, T = 10, B = 24;
  const pts = history.samples;
  const layers = [["idle", "idle"], ["busy", "busy"], ["paused", "paused"]];
  const total = (p) => p.idle + p.busy + p.paused;
  const top = Math.max(1, ...pts.map(total));
  // From the first sample to the last, which is now.
  const t0 = pts[0].at_us, t1 = Math.max(pts[pts.length - 1].at_us, t0 + 1e6);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const svg = s("svg", { class: "chart", id: "capacity-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "GPUs by state over time" });
  for (let v = 0; v <= top; v += Math.max(1, Math.ceil(top / 4))) {
    svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }), s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v));
  }
  // Steps, not slopes: each sample's counts fill the time since the one
  // before, so the last (now) is always drawn.
  const series = [];
  pts.forEach((p, i) => {
    const from = i ? pts[i - 1].at_us : pts.length === 1 ? t0 : p.at_us;
    series.push(Object.assign({}, p, { at_us: from }), pts.length === 1 ? Object.assign({}, p, { at_us: t1 }) : p);
  });
  let below = series.map(() => 0);
  for (const [key, colour] of layers) {
    const above = series.map((p, i) => below[i] + p[key]);
    const line = series.map((p, i) => `${x(p.at_us)},${y(above[i])}`);
    const base = series.map((p, i) => `${x(p.at_us)},${y(below[i])}`).reverse();
    svg.append(s("polygon", { points: line.concat(base).join(" "), class: "fill-" + colour, "data-layer": key }));
    below = above;
  }
  svg.append(
    s("text", { x: L, y: H - 6 }, clock(t0 / 1000, t1 - t0 < 3600e6)),
    s("text", { x: W - R, y: H - 6, "text-anchor": "end" }, clock(t1 / 1000, t1 - t0 < 3600e6)),
  );
  return h("div", {}, svg, legend(layers));
}

// GPU time each institution gave and took, side by side.
function creditsChart(balances) {
  const rows = balances.length, W = chartWidth(), L = 170, R = 80, bar = 12, gap = 14;
  const H = Math.max(1, rows) * (2 * bar + gap) + 10;
  const top = Math.max(1e-9, ...balances.map((b) => Math.max(b.given_s, b.taken_s)));
  const w = (v) => (v / top) * (W - L - R);
  const svg = s("svg", { class: "chart", id: "credits-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "GPU time given and taken per institution" });
  balances.forEach((b, i) => {
    const y0 = 5 + i * (2 * bar + gap);
    svg.append(
      s("text", { x: L - 8, y: y0 + bar + 4, "text-anchor": "end" }, b.institution),
      s("rect", { x: L, y: y0, width: w(b.given_s), height: bar, class: "fill-idle", "data-given": b.institution }),
      s("text", { x: L + w(b.given_s) + 4, y: y0 + bar - 2 }, duration(b.given_s * 1e6)),
      s("rect", { x: L, y: y0 + bar, width: w(b.taken_s), height: bar, class: "fill-running", "data-taken": b.institution }),
      s("text", { x: L + w(b.taken_s) + 4, y: y0 + 2 * bar - 2 }, duration(b.taken_s * 1e6)),
    );
  });
  return h("div", {}, svg, legend([["GPU time given", "idle"], ["GPU time taken", "running"]]));
}

function legend(items) {
  return h("div", { class: "legend" }, items.map(([k, c]) => h("span", {}, h("i", { class: "fill-" + c }), k)));
}

// A job's tasks: verified, running and failed parts of one bar.
function progressBar(p, tasks) {
  const part = (n, cls) => (n ? h("span", { class: cls, "data-n": n, "data-width": (100 * n) / Math.max(1, tasks) }) : null);
  return h(
    "div",
    { class: "bar", title: `${p.verified} verified, ${p.running} running, ${p.queued} queued, ${p.failed} failed of ${tasks}`, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": tasks, "aria-valuenow": p.verified },
    part(p.verified, "verified"),
    part(p.running, "running"),
    part(p.failed, "failed"),
  );
}

// Widths set through the DOM: the style policy allows no inline style
// attributes, but does allow properties set by script.
function paint(root) {
  for (const e of root.querySelectorAll("[data-width]")) e.style.width = e.dataset.width + "%";
}

// ---- pages ----

async function nodePage() {
  const st = state.status;
  const [peers, worker] = await Promise.all([get("/v1/peers"), roles().includes("work") ? get("/v1/worker") : null]);
  return () => {
    const nat = st.nat.split(" ")[0];
    const out = [h("h1", {}, "This node")];
    out.push(
      h(
        "div",
        { class: "grid" },
        card(
          "Identity",
          dl([
            ["PeerId", h("span", { class: "mono", id: "peer-id" }, st.peer_id)],
            ["Alliance", `${st.alliance} (${st.alliance_id.slice(0, 12)}…)`],
            ["Institution", h("span", { id: "institution" }, st.institution)],
            ["Roles", st.roles],
            ["NAT", h("span", {}, badge(nat), " ", st.nat)],
            ["Listening on", st.listen_addrs.map((a) => h("div", { class: "mono" }, a))],
            ["Reachable at", st.external_addrs.map((a) => h("div", { class: "mono" }, a))],
            ["Relayed via", st.relayed_via.map((a) => h("div", { class: "mono" }, a))],
          ]),
        ),
        card(
          "Network",
          dl([
            ["Connected peers", h("span", { id: "connected-peers" }, st.connected_peers)],
            ["Members known", st.members],
            ["Received", bytes(st.bytes_in)],
            ["Sent", bytes(st.bytes_out)],
            ["Revocation lists", st.revocation_lists.map(([k, n]) => h("div", {}, short(k), ` #${n}`))],
            ["Turned away", st.rejected.map((r) => h("div", {}, short(r.peer_id), ": ", r.reason))],
          ]),
        ),
        worker
          ? card(
              "Work done here",
              dl([
                ["Tasks accepted", worker.accepted],
                ["Declined", worker.declined],
                ["Succeeded", h("span", { id: "worker-succeeded" }, worker.succeeded)],
                ["Failed", worker.failed],
                ["Handed back to the owner", worker.handed_back],
                ["Checkpoints sent", worker.checkpoints],
                ["Inputs fetched", `${worker.blobs_fetched} (${bytes(worker.bytes_fetched)}), ${worker.blobs_cached} cached`],
              ]),
            )
          : null,
      ),
    );
    if (worker) out.push(gpuCard(worker));
    out.push(
      card(
        `Connected members (${peers.length})`,
        table(
          ["Peer", "Institution", "Roles", "Link", "Addresses", "Certificate valid until"],
          peers.map((p) =>
            h(
              "tr",
              {},
              h("td", {}, short(p.peer_id)),
              h("td", {}, p.institution),
              h("td", {}, p.roles),
              h("td", {}, p.direct ? "direct" : "relayed"),
              h("td", {}, p.addresses.map((a) => h("div", { class: "mono" }, a))),
              h("td", {}, p.valid_until),
            ),
          ),
          { id: "peers" },
        ),
      ),
    );
    return out;
  };
}

function policyText(p) {
  const parts = [];
  if (!p.shared) parts.push("not shared");
  parts.push(p.windows.length ? `${p.windows.join(", ")} (${p.timezone})` : "always");
  parts.push(`${p.max_tasks} task${p.max_tasks === 1 ? "" : "s"} at once`);
  if (p.max_task_bytes) parts.push(`≤ ${bytes(p.max_task_bytes)} a task`);
  if (p.max_total_bytes) parts.push(`≤ ${bytes(p.max_total_bytes)} in all`);
  if (p.max_task_secs) parts.push(`≤ ${p.max_task_secs} s a task`);
  if (p.allow.length) parts.push("only " + p.allow.join(", "));
  if (p.deny.length) parts.push("never " + p.deny.join(", "));
  return parts.join("; ");
}

function gpuCard(worker) {
  const admin = state.me.admin;
  const act = (label, path) => h("button", { class: "act", type: "button", onclick: () => act_(path) }, label);
  const act_ = async (path) => {
    try {
      await api("POST", path);
      await draw(true);
    } catch (e) {
      showError(e);
    }
  };
  return card(
    "GPUs lent by this node",
    table(
      ["GPU", "Name", "State", "Why", "Tasks", "Owner's terms", admin ? "" : null].filter((x) => x !== null),
      worker.states.map((g) =>
        h(
          "tr",
          { "data-gpu": g.index },
          num(g.index),
          h("td", {}, g.name),
          h("td", { class: "gpu-state" }, badge(g.state)),
          h("td", {}, g.reason),
          num(g.tasks),
          h("td", {}, policyText(g.policy)),
          admin ? h("td", {}, g.paused ? act("Resume", `/v1/worker/resume?gpu=${g.index}`) : act("Pause", `/v1/worker/pause?gpu=${g.index}`)) : null,
        ),
      ),
      { id: "gpus" },
    ),
    admin
      ? h("p", {}, act("Pause every GPU", "/v1/worker/pause"), " ", act("Resume every GPU", "/v1/worker/resume"))
      : h("p", { class: "muted" }, "An admin of this node can pause and resume its GPUs."),
  );
}

async function alliancePage() {
  const [adverts, history] = await Promise.all([get("/v1/gpus"), get("/v1/capacity")]);
  return () => {
    const now = history.samples[history.samples.length - 1];
    const byInst = new Map();
    const rows = [];
    for (const a of adverts) {
      const i = byInst.get(a.institution) || { nodes: 0, gpus: 0, idle: 0, busy: 0, paused: 0, mflops: 0 };
      i.nodes++;
      for (const g of a.gpus) {
        i.gpus++;
        i[g.state.toLowerCase()]++;
        i.mflops += g.bench ? g.bench.fma_mflops : 0;
        rows.push(
          h(
            "tr",
            { "data-peer": a.peer_id, "data-gpu": g.index },
            h("td", {}, a.institution, a.local ? h("span", { class: "muted" }, " (this node)") : null),
            h("td", {}, short(a.peer_id)),
            num(g.index),
            h("td", {}, g.name),
            h("td", {}, `${g.backend}, ${g.device_type}`),
            h("td", { class: "gpu-state" }, badge(g.state)),
            h("td", {}, g.reason),
            num(g.free_slots),
            num(g.bench ? (g.bench.fma_mflops / 1000).toFixed(1) : "—"),
            num(g.bench ? (g.bench.copy_mb_per_s / 1000).toFixed(1) : "—"),
          ),
        );
      }
      byInst.set(a.institution, i);
    }
    return [
      h("h1", {}, "The alliance"),
      tiles([
        ["institutions lending", now.institutions, "tile-institutions"],
        ["nodes lending", now.nodes, "tile-nodes"],
        ["GPUs idle", now.idle, "tile-idle"],
        ["GPUs busy", now.busy, "tile-busy"],
        ["GPUs paused", now.paused, "tile-paused"],
        ["idle GFLOP/s", (now.idle_mflops / 1000).toFixed(1), "tile-gflops"],
      ]),
      card(`GPUs over time (a sample every ${history.interval_secs} s, kept a day)`, capacityChart(history)),
      card(
        "Institutions",
        table(
          ["Institution", { text: "Nodes", cls: "num" }, { text: "GPUs", cls: "num" }, { text: "Idle", cls: "num" }, { text: "Busy", cls: "num" }, { text: "Paused", cls: "num" }, { text: "GFLOP/s (FMA)", cls: "num" }],
          [...byInst.entries()].sort().map(([name, i]) =>
            h("tr", {}, h("td", {}, name), num(i.nodes), num(i.gpus), num(i.idle), num(i.busy), num(i.paused), num((i.mflops / 1000).toFixed(1))),
          ),
          { id: "institutions" },
        ),
      ),
      card(
        "Every GPU lent",
        table(
          ["Institution", "Node", { text: "GPU", cls: "num" }, "Name", "Driven by", "State", "Why", { text: "Free slots", cls: "num" }, { text: "GFLOP/s", cls: "num" }, { text: "Copy GB/s", cls: "num" }],
          rows,
          { id: "alliance-gpus" },
        ),
      ),
    ];
  };
}

function noSubmit() {
  return () => [h("h1", {}, "Jobs"), card(null, h("p", {}, "This node's certificate lacks the submit role: it takes no jobs. Open the dashboard of a node of your institution that submits."))];
}

async function jobsPage() {
  if (!roles().includes("submit")) return noSubmit();
  const page = await get("/v1/jobs?limit=100");
  return () => [
    h("h1", {}, state.me.admin ? "Every job on this node" : `${state.me.name}'s jobs`),
    card(
      null,
      table(
        ["Job", "Name", "Owner", "State", "Progress", "Tasks", "Waiting for", { text: "GPU time", cls: "num" }, "Submitted"],
        page.jobs.map((j) =>
          h(
            "tr",
            { "data-job": j.id, "data-state": j.state },
            h("td", {}, h("a", { href: `#/jobs/${j.id}` }, short(j.id))),
            h("td", {}, j.name),
            h("td", {}, j.owner),
            h("td", { class: "job-state" }, badge(j.state)),
            h("td", {}, progressBar(j.progress, j.tasks)),
            h("td", {}, `${j.progress.verified}/${j.tasks}`, j.progress.failed ? h("span", { class: "error" }, `, ${j.progress.failed} failed`) : null),
            h("td", {}, j.state === "active" ? j.waiting.map(([why, n]) => h("div", {}, `${n}: ${why}`)) : ""),
            num(duration(j.gpu_time_us)),
            h("td", {}, when(j.submitted_at)),
          ),
        ),
        { id: "jobs" },
      ),
      page.next ? h("p", { class: "muted" }, `Older jobs: GET /v1/jobs?after=${page.next}`) : null,
    ),
  ];
}

async function jobPage(id) {
  if (!roles().includes("submit")) return noSubmit();
  const job = await get(`/v1/jobs/${encodeURIComponent(id)}`);
  return () => {
    const j = job.summary;
    const cancel = async () => {
      try {
        await api("POST", `/v1/jobs/${encodeURIComponent(id)}/cancel`);
        await draw(true);
      } catch (e) {
        showError(e);
      }
    };
    return [
      h("h1", {}, `Job ${j.name} `, badge(j.state)),
      h(
        "div",
        { class: "grid" },
        card(
          null,
          dl([
            ["Id", h("span", { class: "mono" }, j.id)],
            ["Owner", j.owner],
            ["Progress", h("span", {}, progressBar(j.progress, j.tasks), ` ${j.progress.verified} of ${j.tasks} verified`)],
            ["Replicas a task", j.redundancy],
            ["GPU time", duration(j.gpu_time_us)],
            ["Compiling", duration(j.compile_time_us)],
            ["Submitted", when(j.submitted_at)],
            ["Finished", when(j.finished_at)],
            ["Outputs", job.outputs.map((o) => h("div", {}, `binding ${o.binding}: ${o.len} × ${o.elem} a task, `, h("span", { class: "mono" }, `GET /v1/jobs/${j.id}/outputs/${o.binding}`)))],
          ]),
          j.state === "active" ? h("p", {}, h("button", { class: "act", type: "button", onclick: cancel }, "Cancel the job")) : null,
        ),
      ),
      card(
        "Tasks",
        table(
          ["Task", "State", "Replicas: worker, institution, state, GPU time", "Checkpoints", "Why"],
          job.tasks.map((t) =>
            h(
              "tr",
              { "data-task": t.index },
              num(t.index),
              h("td", {}, badge(t.state), t.spot_check ? h("div", { class: "muted" }, "spot check") : null, t.rechecked ? h("div", { class: "muted" }, "rechecked") : null),
              h(
                "td",
                {},
                t.replicas.map((r) =>
                  h("div", {}, `#${r.attempt} `, short(r.worker), ` ${r.institution} `, badge(r.state), r.gpu_time_us ? ` ${duration(r.gpu_time_us)}` : "", r.reason ? h("span", { class: "muted" }, ` ${r.reason}`) : null, r.start_step ? ` from step ${r.start_step}` : ""),
                ),
              ),
              h("td", {}, t.checkpoints.length ? `${t.checkpoints.length} sent, latest step ${t.checkpoints[t.checkpoints.length - 1].step}` : "", t.checkpoint ? h("div", {}, `agreed at step ${t.checkpoint.step}`) : null),
              h("td", {}, t.failure ? h("span", { class: "error" }, t.failure) : t.state === "waiting" ? t.waiting || "" : ""),
            ),
          ),
          { id: "tasks" },
        ),
      ),
    ];
  };
}

async function trustPage() {
  const submits = roles().includes("submit");
  const [credits, rep] = await Promise.all([get("/v1/credits"), submits ? get("/v1/reputation") : null]);
  const score = (x) => x.score.toFixed(3);
  return () => [
    h("h1", {}, "Reputation and credits"),
    card(
      "GPU time given and taken, per institution (decayed GPU seconds)",
      credits.length ? creditsChart(credits) : h("p", { class: "muted" }, "No credits yet: they come with the first verified results."),
      table(
        ["Institution", { text: "Given (s)", cls: "num" }, { text: "Taken (s)", cls: "num" }, { text: "Balance (s)", cls: "num" }, { text: "Credits", cls: "num" }],
        credits.map((b) => h("tr", { "data-institution": b.institution }, h("td", {}, b.institution), num(b.given_s.toFixed(3)), num(b.taken_s.toFixed(3)), num(b.balance_s.toFixed(3)), num(b.credits))),
        { id: "credits" },
      ),
    ),
    rep
      ? [
          card(
            "Institutions, as this node verified their results",
            table(
              ["Institution", { text: "Workers", cls: "num" }, { text: "Agreed", cls: "num" }, { text: "Wrong", cls: "num" }, { text: "Lapses", cls: "num" }, { text: "Score", cls: "num" }],
              rep.institutions.map((i) => h("tr", {}, h("td", {}, i.institution), num(i.workers), num(i.agreed.toFixed(2)), num(i.wrong.toFixed(2)), num(i.lapses.toFixed(2)), num(score(i)))),
              { id: "reputation-institutions" },
            ),
          ),
          card(
            "Workers",
            table(
              ["Worker", "Institution", { text: "Agreed", cls: "num" }, { text: "Wrong", cls: "num" }, { text: "Lapses", cls: "num" }, { text: "Streak", cls: "num" }, { text: "Score", cls: "num" }, "Trusted", "Replication"],
              rep.workers.map((w) =>
                h("tr", {}, h("td", {}, short(w.peer_id)), h("td", {}, w.institution), num(w.agreed.toFixed(2)), num(w.wrong.toFixed(2)), num(w.lapses.toFixed(2)), num(w.streak), num(score(w)), h("td", {}, badge(w.trusted ? "yes" : "no")), h("td", {}, w.replication)),
              ),
              { id: "reputation-workers" },
            ),
          ),
        ]
      : card(null, h("p", { class: "muted" }, "This node submits no jobs, so it verified no one's results.")),
  ];
}

// ---- the frame: login, navigation, polling ----

const $ = (id) => document.getElementById(id);

function route() {
  const parts = (location.hash || "#/node").slice(2).split("/");
  if (parts[0] === "jobs" && parts[1]) return { name: "jobs", load: () => jobPage(decodeURIComponent(parts[1])) };
  const pages = { node: nodePage, alliance: alliancePage, jobs: jobsPage, trust: trustPage };
  const name = pages[parts[0]] ? parts[0] : "node";
  return { name, load: pages[name] };
}

function showError(e) {
  const b = $("banner");
  b.replaceChildren(h("strong", {}, e.message), e.hint ? " — " + e.hint : "");
  b.hidden = false;
}

async function draw(force) {
  const r = route();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("current", a.dataset.page === r.name);
  try {
    state.status = await get("/v1/status");
    const render = await r.load();
    const nodes = render();
    // Keep the page as it is (and the button under the pointer) when
    // nothing in it changed.
    const wrap = h("div", {}, nodes);
    const text = location.hash + wrap.textContent + wrap.querySelectorAll("*").length;
    $("banner").hidden = true;
    $("updated").textContent = "Last update " + new Date().toLocaleTimeString();
    if (!force && text === state.drawn) return;
    state.drawn = text;
    paint(wrap);
    $("page").replaceChildren(...wrap.childNodes);
    document.body.dataset.page = r.name;
  } catch (e) {
    if (e.status === 401) return logout("The node no longer takes this token: log in again.");
    showError(e);
  }
}

function schedule() {
  clearInterval(state.timer);
  state.timer = setInterval(() => draw(false), POLL_MS);
}

async function login(token) {
  state.token = token;
  try {
    state.me = await get("/v1/me");
  } catch (e) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    throw e;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("nav").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = `${state.me.name}${state.me.admin ? " (admin)" : ""}`;
  document.body.dataset.user = state.me.name;
  await draw(true);
  schedule();
}

function logout(message) {
  clearInterval(state.timer);
  state.token = null;
  state.me = null;
  state.drawn = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("page").replaceChildren();
  $("nav").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("banner").hidden = true;
  $("login-error").textContent = message || "";
  $("login").hidden = false;
  delete document.body.dataset.user;
  $("token").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("login-error").textContent = "";
    try {
      await login($("token").value.trim());
      $("token").value = "";
    } catch (e) {
      $("login-error").textContent = e.status === 401 ? "The node does not know this token." : `${e.message} ${e.hint}`;
    }
  });
  $("logout").addEventListener("click", () => logout());
  window.addEventListener("hashchange", () => {
    state.drawn = null;
    if (state.me) draw(true);
  });
  if (state.token) login(state.token).catch(() => logout());
  else logout();
});
