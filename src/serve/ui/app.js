// ferry dashboard: a hand-written single-page app over the HTTP API of
// `ferry serve` (docs/API.md). Hash routes: `#/` the task list, `#/new` the
// create-task wizard, `#/tasks/{id}` one task. No framework and no build
// step: ferry compiles this file into its binary.
//
// Every string the server sends is put in the page with `textContent` or
// `setAttribute`, never parsed as HTML.
"use strict";

(function () {
  const API = "/api/v1";
  const REFRESH_MS = 2000;
  const NAME_PATTERN = /^[a-z0-9][a-z0-9-]{0,47}$/;
  const RUNNING_STATES = ["CREATED", "PRECHECK", "FULL_SYNC", "INCREMENTAL"];
  const RESTARTABLE_STATES = ["STOPPED", "FAILED"];

  // ---------------------------------------------------------------- DOM

  /** An element with attributes (`text` sets its text, `on*` adds a listener) and children. */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    appendChildren(node, children);
    return node;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    appendChildren(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (value === true) node.setAttribute(key, "");
      else node.setAttribute(key, String(value));
    }
  }

  function appendChildren(node, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
  }

  /** Replaces a node's children (null and false are skipped, unlike `replaceChildren`). */
  function setChildren(node, ...children) {
    node.replaceChildren();
    appendChildren(node, children);
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  // ---------------------------------------------------------------- formatting

  function fmtCount(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : "—";
  }

  function fmtMs(ms) {
    if (typeof ms !== "number") return "—";
    if (ms < 1000) return `${ms} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    const minutes = Math.floor(ms / 60000);
    if (minutes < 60) return `${minutes}m ${Math.floor((ms % 60000) / 1000)}s`;
    return `${Math.floor(minutes / 60)}h ${minutes % 60}m`;
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
  }

  function fmtClock(unixMs) {
    if (typeof unixMs !== "number") return "—";
    return new Date(unixMs).toLocaleTimeString("en-GB", { hour12: false });
  }

  function fmtDateTime(unixMs) {
    if (typeof unixMs !== "number") return "—";
    const date = new Date(unixMs);
    return `${date.toLocaleDateString("en-CA")} ${fmtClock(unixMs)}`;
  }

  function fmtAgo(unixMs) {
    if (typeof unixMs !== "number") return "—";
    const seconds = Math.max(0, Math.round((Date.now() - unixMs) / 1000));
    if (seconds < 5) return "just now";
    if (seconds < 60) return `${seconds}s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
    return `${Math.floor(seconds / 86400)}d ago`;
  }

  /** The badge colour of a task state, sync status or precheck verdict. */
  function tone(word) {
    switch (word) {
      case "INCREMENTAL":
      case "ONLINE":
      case "PASS":
        return "ok";
      case "FULL_SYNC":
      case "PRECHECK":
      case "CONNECTING":
      case "LOADING":
      case "HANDOFF":
        return "info";
      case "STOPPED":
      case "WARN":
      case "OFFLINE":
        return "warn";
      case "FAILED":
      case "FAIL":
      case "BLOCKED":
        return "fail";
      default:
        return "";
    }
  }

  function badge(word, attrs) {
    const node = h("span", attrs);
    const extra = (attrs && attrs.class) || "";
    setBadge(node, word, extra);
    return node;
  }

  /** Sets a badge's word and colour in place (`extra`: more classes). */
  function setBadge(node, word, extra) {
    const text = word === null || word === undefined ? "—" : String(word);
    node.textContent = text;
    node.className = `badge ${tone(text)} ${extra || ""}`.trim();
  }

  /** A progress bar of `received` out of `total` bytes; `done` paints it green. */
  function progressBar(received, total, done, attrs) {
    const bar = h("div", { class: "bar" });
    const node = h("div", Object.assign({ class: "progress", role: "progressbar" }, attrs || {}), bar);
    let label;
    if (typeof total === "number" && total > 0 && typeof received === "number") {
      const percent = Math.min(100, (received / total) * 100);
      bar.style.width = `${percent.toFixed(1)}%`;
      node.setAttribute("aria-valuenow", percent.toFixed(0));
      node.setAttribute("aria-valuemin", "0");
      node.setAttribute("aria-valuemax", "100");
      label = `${fmtBytes(received)} of ${fmtBytes(total)} (${percent.toFixed(0)}%)`;
    } else if (done) {
      bar.style.width = "100%";
      label = typeof received === "number" ? fmtBytes(received) : "done";
    } else {
      node.classList.add("indeterminate");
      label = typeof received === "number" ? `${fmtBytes(received)} received` : "waiting";
    }
    if (done) node.classList.add("done");
    return { bar: node, label };
  }

  // ---------------------------------------------------------------- API

  /**
   * Calls the API. Never throws: `{ok, status, body, error}` where `error`
   * is the server's `{"error": ...}` or what failed on the way.
   */
  async function api(method, path, body) {
    const init = { method, headers: { Accept: "application/json" } };
    const token = storedToken();
    if (token) init.headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(API + path, init);
    } catch (error) {
      return { ok: false, status: 0, body: null, error: `cannot reach ferry serve (${error.message})` };
    }
    const text = await response.text().catch(() => "");
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = null;
      }
    }
    if (response.status === 401) askForToken(token !== null);
    let error = null;
    if (!response.ok) {
      if (data && typeof data.error === "string") error = data.error;
      else error = `HTTP ${response.status}${text ? `: ${text.slice(0, 300)}` : ""}`;
    }
    return { ok: response.ok, status: response.status, body: data, error };
  }

  // ---------------------------------------------------------------- access token

  // A daemon started with --token-file wants `Authorization: Bearer` on every
  // API call; the token is asked for in the page and kept for this tab only.
  const TOKEN_KEY = "ferry.token";

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (_) {
      return null;
    }
  }

  function askForToken(rejected) {
    const bar = document.getElementById("token-bar");
    if (!bar.hidden) return;
    const input = h("input", { id: "token-input", type: "password", autocomplete: "off", placeholder: "bearer token" });
    const save = h("button", { type: "submit", class: "button primary", id: "token-save" }, "Use token");
    const form = h(
      "form",
      { class: "token-form" },
      h("span", null, rejected ? "The access token was refused; enter it again:" : "This ferry serve requires an access token (--token-file):"),
      input,
      save,
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      try {
        sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      } catch (_) {
        // Private modes may refuse storage; the token then lasts until reload.
      }
      show(bar, false);
      route();
    });
    setChildren(bar, form);
    show(bar, true);
    input.focus();
  }

  /** An error text: a table (several lines) keeps its columns in a monospace block. */
  function errorText(error) {
    const text = String(error);
    return text.includes("\n") ? h("pre", { class: "error-text" }, text) : text;
  }

  function taskPath(id) {
    return `/tasks/${encodeURIComponent(id)}`;
  }

  function taskHash(id) {
    return `#/tasks/${encodeURIComponent(id)}`;
  }

  // ---------------------------------------------------------------- router

  let leaveHooks = [];
  /** A message for the next page (`{warn, text}`, e.g. "task canceled" on the list). */
  let flash = null;

  function onLeave(hook) {
    leaveHooks.push(hook);
  }

  /**
   * Runs `load` now and every REFRESH_MS after the previous run finished,
   * until the page is left. Returns a function that runs it again at once.
   */
  function poll(load) {
    let active = true;
    let running = false;
    let again = false;
    let timer = null;
    async function tick() {
      if (!active) return;
      if (running) {
        again = true;
        return;
      }
      clearTimeout(timer);
      running = true;
      try {
        await load();
      } finally {
        running = false;
      }
      if (!active) return;
      if (again) {
        again = false;
        tick();
      } else {
        timer = setTimeout(tick, REFRESH_MS);
      }
    }
    onLeave(() => {
      active = false;
      clearTimeout(timer);
    });
    tick();
    return tick;
  }

  function route() {
    for (const hook of leaveHooks.splice(0)) hook();
    closeModal(false);
    const path = location.hash.replace(/^#/, "") || "/";
    const root = document.getElementById("app");
    root.replaceChildren();
    let match;
    if (path === "/") {
      setActiveNav("list");
      document.title = "Tasks · ferry";
      renderList(root);
    } else if (path === "/new") {
      setActiveNav("new");
      document.title = "New task · ferry";
      renderWizard(root);
    } else if ((match = /^\/tasks\/([^/]+)$/.exec(path))) {
      setActiveNav("list");
      let id;
      try {
        id = decodeURIComponent(match[1]);
      } catch (_) {
        id = match[1];
      }
      document.title = `${id} · ferry`;
      renderTask(root, id);
    } else {
      setActiveNav(null);
      root.append(
        h("div", { class: "card empty", id: "route-not-found" }, "No such page. ", h("a", { href: "#/" }, "Back to the tasks"), "."),
      );
    }
    window.scrollTo(0, 0);
  }

  function setActiveNav(name) {
    for (const link of document.querySelectorAll(".nav a[data-route]")) {
      link.classList.toggle("active", link.dataset.route === name);
    }
  }

  // ---------------------------------------------------------------- confirmation modal

  let modalResolve = null;

  /** Asks in an in-page dialog; resolves to true on Confirm, false on Back or Escape. */
  function confirmDialog({ title, body, confirm, danger }) {
    closeModal(false);
    const backdrop = document.getElementById("modal-backdrop");
    const confirmButton = document.getElementById("modal-confirm");
    document.getElementById("modal-title").textContent = title;
    document.getElementById("modal-body").textContent = body;
    confirmButton.textContent = confirm;
    confirmButton.className = danger ? "button danger-solid" : "button primary";
    show(backdrop, true);
    document.getElementById("modal-dismiss").focus();
    return new Promise((resolve) => {
      modalResolve = resolve;
    });
  }

  function closeModal(answer) {
    const backdrop = document.getElementById("modal-backdrop");
    if (backdrop) show(backdrop, false);
    if (modalResolve) {
      const resolve = modalResolve;
      modalResolve = null;
      resolve(answer);
    }
  }

  function installModal() {
    document.getElementById("modal-confirm").addEventListener("click", () => closeModal(true));
    document.getElementById("modal-dismiss").addEventListener("click", () => closeModal(false));
    document.getElementById("modal-backdrop").addEventListener("click", (event) => {
      if (event.target.id === "modal-backdrop") closeModal(false);
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && modalResolve) closeModal(false);
    });
  }

  // ---------------------------------------------------------------- task list

  function renderList(root) {
    const listError = h("div", { class: "alert alert-error", id: "list-error", role: "alert", hidden: true });
    const rows = h("tbody", { id: "task-rows" });
    const table = h(
      "table",
      { class: "table", id: "task-table" },
      h(
        "thead",
        null,
        h(
          "tr",
          null,
          h("th", null, "Name"),
          h("th", null, "Mode"),
          h("th", null, "Source → Target"),
          h("th", null, "State"),
          h("th", { class: "num" }, "LogId Lag"),
          h("th", { class: "num" }, "Latency"),
          h("th", null, "Full sync"),
          h("th", null, "Updated"),
        ),
      ),
      rows,
    );
    const empty = h(
      "div",
      { class: "empty", id: "task-empty", hidden: true },
      "No sync tasks yet. ",
      h("a", { href: "#/new" }, "Create the first one"),
      ".",
    );
    const loading = h("div", { class: "empty", id: "task-loading" }, "Loading tasks…");
    const refreshed = h("span", { class: "muted", id: "list-refreshed" });

    root.append(
      h(
        "div",
        { class: "page-head" },
        h("div", null, h("h1", null, "Sync tasks"), h("div", { class: "subtitle" }, "Every sync this ferry serve runs. Refreshed every 2 s.")),
        h("div", { class: "page-actions" }, refreshed, h("a", { href: "#/new", class: "button primary", id: "new-task" }, "New task")),
      ),
    );
    if (flash) {
      root.append(h("div", { class: `alert ${flash.warn ? "alert-warn" : "alert-ok"}`, id: "flash", role: "status" }, flash.text));
      flash = null;
    }
    root.append(listError, h("div", { class: "card flush" }, table, loading, empty));
    show(table, false);

    let shown = null;
    poll(async () => {
      const reply = await api("GET", "/tasks");
      if (!reply.ok) {
        listError.textContent = `Could not load the tasks: ${reply.error}`;
        show(listError, true);
        return;
      }
      show(listError, false);
      show(loading, false);
      refreshed.textContent = `Updated ${fmtClock(Date.now())}`;
      const tasks = reply.body && Array.isArray(reply.body.tasks) ? reply.body.tasks : [];
      // Rebuild the rows only when something a row shows changed, so a row
      // is not replaced under a click for nothing.
      const signature = JSON.stringify(tasks);
      if (signature === shown) return;
      shown = signature;
      setChildren(rows, ...tasks.map(taskRow));
      show(table, tasks.length > 0);
      show(empty, tasks.length === 0);
    });
  }

  /** One line of an error: the first that says FAIL (a failed precheck's error is its table), else the first. */
  function summary(error) {
    const lines = String(error)
      .split("\n")
      .map((line) => line.trim())
      .filter((line) => line.length > 0);
    return lines.find((line) => /\bFAIL\b/.test(line)) || lines[0] || "";
  }

  function taskRow(task) {
    const nameCell = h(
      "td",
      null,
      h("a", { href: taskHash(task.id), class: "task-link", "data-testid": "task-link" }, task.name || task.id),
    );
    if (task.state === "FAILED" && task.error) {
      nameCell.append(h("div", { class: "row-error", title: String(task.error), "data-testid": "task-row-error" }, summary(task.error)));
    }
    let fullSync = h("span", { class: "muted" }, "—");
    if (task.full_sync) {
      const progress = progressBar(task.full_sync.bytes_received, task.full_sync.bytes_total, task.full_sync.applied);
      fullSync = h("div", null, progress.bar, h("div", { class: "progress-label" }, task.full_sync.applied ? "applied" : progress.label));
    }
    return h(
      "tr",
      { "data-testid": "task-row", "data-task-id": task.id, "data-state": task.state },
      nameCell,
      h("td", { class: "nowrap" }, task.mode || "one-way"),
      h(
        "td",
        { class: "endpoint" },
        h("div", null, task.source),
        h("div", null, h("span", { class: "arrow" }, task.mode === "two-way" ? "⇄" : "→"), task.target),
      ),
      h("td", null, badge(task.state, { "data-testid": "task-state" })),
      h("td", { class: "num" }, fmtCount(task.lag_entries)),
      h("td", { class: "num" }, fmtMs(task.latency_ms)),
      h("td", null, fullSync),
      h("td", { class: "muted", title: fmtDateTime(task.updated_unix_ms) }, fmtAgo(task.updated_unix_ms)),
    );
  }

  // ---------------------------------------------------------------- wizard

  function renderWizard(root) {
    const inputs = {};
    const errors = {};

    function field(key, label, control, options) {
      const opts = options || {};
      inputs[key] = control;
      errors[key] = h("div", { class: "field-error", id: `${control.id}-error`, hidden: true });
      return h(
        "div",
        { class: `field${opts.wide ? " wide" : ""}` },
        h("label", { for: control.id }, label, opts.optional ? h("span", { class: "optional" }, " (optional)") : null),
        control,
        opts.hint ? h("div", { class: "hint" }, opts.hint) : null,
        errors[key],
      );
    }

    const text = (id, placeholder, extra) =>
      h("input", Object.assign({ id, name: id, type: "text", placeholder, autocomplete: "off", spellcheck: "false" }, extra || {}));
    const password = (id) => h("input", { id, name: id, type: "password", autocomplete: "new-password" });
    const select = (id, values) => h("select", { id, name: id }, values.map(([value, label]) => h("option", { value }, label)));

    const conflictField = field("conflict", "Conflicts", select("f-conflict", [
      ["report", "report (log them)"],
      ["source-wins", "source-wins"],
      ["target-wins", "target-wins"],
    ]), { hint: "Two-way only: what happens when both sides wrote a key." });

    const form = h(
      "form",
      { id: "task-form", novalidate: true, autocomplete: "off" },
      h(
        "div",
        { class: "form-grid" },
        field("name", "Name", text("f-name", "orders", { maxlength: "48" }), {
          wide: true,
          hint: "The task's id: 1 to 48 of a-z, 0-9 and -, starting with a letter or digit.",
        }),
        field("source", "Source", text("f-source", "redis://127.0.0.1:6379"), {
          hint: "redis://[user@]host:port — a standalone server or any node of a cluster.",
        }),
        field("target", "Target", text("f-target", "redis://127.0.0.1:6380"), {
          hint: "redis://[user@]host:port — a standalone server or any node of a cluster.",
        }),
        field("source_password", "Source password", password("f-source-password"), { optional: true }),
        field("target_password", "Target password", password("f-target-password"), { optional: true }),
      ),
      h(
        "fieldset",
        null,
        h("legend", null, "Options"),
        h(
          "div",
          { class: "form-grid" },
          field("mode", "Mode", select("f-mode", [
            ["one-way", "one-way"],
            ["two-way", "two-way (two standalone servers or two clusters, Redis 7+)"],
          ])),
          field("existing_data", "Existing data on the target", select("f-existing-data", [
            ["refuse", "refuse (default)"],
            ["keep", "keep"],
            ["flush", "flush"],
          ]), { hint: "What the first full sync does when the owned dbs already hold keys." }),
          field("wal_ttl", "WAL TTL", text("f-wal-ttl", "24h"), { optional: true, hint: "How long WAL entries are kept, e.g. 24h, 90m." }),
          conflictField,
          field("dbs", "Databases", text("f-dbs", "0, 1"), { optional: true, hint: "Comma-separated db numbers; empty for all." }),
          field("key_prefix", "Key prefixes", text("f-key-prefix", "app:"), { optional: true, hint: "Comma-separated; empty for every key." }),
          field("exclude_key_prefix", "Excluded key prefixes", text("f-exclude-key-prefix", "app:tmp:"), { optional: true, hint: "Comma-separated." }),
        ),
      ),
    );

    const steps = h(
      "ol",
      { class: "steps", id: "wizard-steps" },
      h("li", { id: "step-1", class: "active" }, "Describe the sync"),
      h("li", { id: "step-2" }, "Run the precheck"),
      h("li", { id: "step-3" }, "Create and start"),
    );

    const precheckButton = h("button", { type: "button", class: "button", id: "btn-precheck" }, "Run precheck");
    const createButton = h("button", { type: "button", class: "button primary", id: "btn-create", disabled: true }, "Create and start");
    const precheckNote = h("span", { class: "action-note", id: "precheck-note" }, "Run the precheck first: Create is enabled once it has no FAIL.");
    const precheckResult = h("div", { id: "precheck-result", hidden: true });
    const wizardError = h("div", { class: "alert alert-error", id: "wizard-error", role: "alert", hidden: true });

    root.append(
      h(
        "div",
        { class: "page-head" },
        h("div", null, h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Tasks"), " / new"), h("h1", null, "New sync task")),
      ),
      steps,
      h("div", { class: "card", id: "wizard-step-1" }, h("h2", null, "1. Source, target and options"), form),
      h(
        "div",
        { class: "card", id: "wizard-step-2" },
        h("h2", null, "2. Precheck, then create"),
        h(
          "p",
          { class: "muted" },
          "The precheck connects to both sides and checks what the sync needs (replication access, versions, memory, existing data). Nothing is stored.",
        ),
        wizardError,
        precheckResult,
        h("div", { class: "actions" }, precheckButton, createButton, precheckNote),
      ),
    );

    // The spec the last precheck without FAIL ran on (JSON), or null.
    let passedSpec = null;
    let busy = false;

    function updateMode() {
      conflictField.hidden = inputs.mode.value !== "two-way";
    }
    updateMode();

    function setStep(step) {
      for (let i = 1; i <= 3; i += 1) {
        const item = document.getElementById(`step-${i}`);
        item.classList.toggle("active", i === step);
        item.classList.toggle("done", i < step);
      }
    }

    function clearErrors() {
      for (const key of Object.keys(errors)) {
        show(errors[key], false);
        inputs[key].classList.remove("invalid");
      }
    }

    function fieldError(key, message) {
      errors[key].textContent = message;
      show(errors[key], true);
      inputs[key].classList.add("invalid");
    }

    function list(value) {
      return value
        .split(",")
        .map((item) => item.trim())
        .filter((item) => item.length > 0);
    }

    /** The spec of docs/API.md from the form, or null after marking the fields in error. */
    function readSpec() {
      clearErrors();
      let valid = true;
      const value = (key) => inputs[key].value.trim();
      const spec = { name: value("name"), source: value("source"), target: value("target"), mode: inputs.mode.value };
      if (!NAME_PATTERN.test(spec.name)) {
        fieldError("name", spec.name ? "1 to 48 of a-z, 0-9 and -, starting with a letter or digit" : "required");
        valid = false;
      }
      for (const side of ["source", "target"]) {
        const url = spec[side];
        if (!url) {
          fieldError(side, "required");
          valid = false;
        } else if (!/^redis:\/\/[^\s]+$/.test(url)) {
          fieldError(side, "a redis://host:port URL");
          valid = false;
        } else if (/^redis:\/\/[^@/]*:[^@/]*@/.test(url)) {
          fieldError(side, "no password in the URL: use the password field");
          valid = false;
        }
      }
      if (inputs.source_password.value) spec.source_password = inputs.source_password.value;
      if (inputs.target_password.value) spec.target_password = inputs.target_password.value;
      const options = { existing_data: inputs.existing_data.value };
      if (value("wal_ttl")) options.wal_ttl = value("wal_ttl");
      if (spec.mode === "two-way") options.conflict = inputs.conflict.value;
      const dbs = list(inputs.dbs.value);
      if (dbs.length > 0) {
        if (dbs.every((db) => /^\d+$/.test(db))) {
          options.dbs = dbs.map(Number);
        } else {
          fieldError("dbs", "db numbers, e.g. 0, 1");
          valid = false;
        }
      }
      const prefixes = list(inputs.key_prefix.value);
      if (prefixes.length > 0) options.key_prefix = prefixes;
      const excluded = list(inputs.exclude_key_prefix.value);
      if (excluded.length > 0) options.exclude_key_prefix = excluded;
      spec.options = options;
      return valid ? spec : null;
    }

    function refreshCreate() {
      const spec = readSpecQuiet();
      const ready = passedSpec !== null && spec !== null && JSON.stringify(spec) === passedSpec;
      createButton.disabled = busy || !ready;
      precheckButton.disabled = busy;
    }

    /** The spec without marking errors (for change tracking). */
    function readSpecQuiet() {
      const marked = Object.keys(errors).filter((key) => !errors[key].hidden);
      const spec = readSpec();
      if (marked.length === 0) clearErrors();
      return spec;
    }

    form.addEventListener("input", () => {
      updateMode();
      if (passedSpec !== null && JSON.stringify(readSpecQuiet()) !== passedSpec) {
        passedSpec = null;
        precheckNote.textContent = "The form changed since the precheck: run it again.";
        setStep(1);
      }
      refreshCreate();
    });
    form.addEventListener("change", () => {
      updateMode();
      refreshCreate();
    });
    form.addEventListener("submit", (event) => event.preventDefault());

    precheckButton.addEventListener("click", async () => {
      show(wizardError, false);
      const spec = readSpec();
      if (!spec) {
        precheckNote.textContent = "Fix the fields marked above.";
        return;
      }
      busy = true;
      passedSpec = null;
      refreshCreate();
      setStep(2);
      precheckButton.textContent = "Running precheck…";
      precheckNote.textContent = "Connecting to the source and the target…";
      const reply = await api("POST", "/precheck", spec);
      busy = false;
      precheckButton.textContent = "Run precheck again";
      if (!reply.ok) {
        show(precheckResult, false);
        setChildren(wizardError, h("div", { class: "alert-title" }, "The precheck could not run"), errorText(reply.error));
        show(wizardError, true);
        precheckNote.textContent = "Fix the problem and run the precheck again.";
        refreshCreate();
        return;
      }
      renderPrecheck(precheckResult, reply.body);
      const verdict = reply.body && reply.body.verdict;
      if (verdict === "FAIL") {
        precheckNote.textContent = "The precheck failed: fix what it says and run it again.";
      } else {
        passedSpec = JSON.stringify(spec);
        setStep(3);
        precheckNote.textContent =
          verdict === "WARN" ? "The precheck passed with warnings: read them before you create the task." : "The precheck passed.";
      }
      refreshCreate();
    });

    createButton.addEventListener("click", async () => {
      const spec = readSpec();
      if (!spec || JSON.stringify(spec) !== passedSpec) {
        refreshCreate();
        return;
      }
      show(wizardError, false);
      busy = true;
      refreshCreate();
      createButton.textContent = "Creating…";
      const reply = await api("POST", "/tasks", spec);
      busy = false;
      createButton.textContent = "Create and start";
      if (reply.ok) {
        const task = reply.body && reply.body.task;
        location.hash = taskHash((task && task.id) || spec.name);
        return;
      }
      passedSpec = null;
      if (reply.status === 422 && reply.body && reply.body.precheck) {
        renderPrecheck(precheckResult, reply.body.precheck);
        setStep(2);
      }
      const failedTask = reply.status === 422 && reply.body && reply.body.task;
      setChildren(
        wizardError,
        h("div", { class: "alert-title" }, failedTask ? "The task was stored as FAILED: its precheck failed" : `The task was not created (HTTP ${reply.status})`),
        errorText(reply.error),
        failedTask
          ? h("div", null, h("a", { href: taskHash(failedTask.id), id: "failed-task-link" }, `Open task "${failedTask.id}"`), " to start it again once fixed, or cancel it.")
          : null,
      );
      show(wizardError, true);
      precheckNote.textContent = reply.status === 422 ? "The task's precheck failed: fix it and run the precheck again." : "";
      refreshCreate();
    });

    inputs.name.focus();
  }

  /**
   * The rows of the text table `ferry precheck` prints (src/table.rs: a
   * `+---+` rule gives the columns' bounds), as `checks`; empty when the
   * text is not that table.
   */
  function checksOfTable(text) {
    if (typeof text !== "string") return [];
    const lines = text.split("\n").map((line) => Array.from(line));
    const rule = lines.find((line) => line[0] === "+" && line[1] === "-");
    if (!rule) return [];
    const bounds = [];
    rule.forEach((char, index) => {
      if (char === "+") bounds.push(index);
    });
    const rows = lines
      .filter((line) => line[0] === "|" && line.length === rule.length)
      .map((line) => bounds.slice(1).map((end, column) => line.slice(bounds[column] + 1, end).join("").trim()));
    const [header, ...body] = rows;
    if (!header || header.join(",") !== "Check,Result,Detail") return [];
    return body.map(([check, verdict, detail]) => ({ check, verdict, detail }));
  }

  /** The PASS / WARN / FAIL table of a precheck reply (`checks`, else its text `table`). */
  function renderPrecheck(container, precheck) {
    container.replaceChildren();
    if (!precheck) {
      show(container, false);
      return;
    }
    const verdict = precheck.verdict || "—";
    const checks = Array.isArray(precheck.checks) ? precheck.checks : checksOfTable(precheck.table);
    const counts = { WARN: 0, FAIL: 0 };
    for (const check of checks) if (check.verdict in counts) counts[check.verdict] += 1;
    container.append(
      h(
        "div",
        { class: "verdict-line" },
        h("strong", null, "Precheck"),
        badge(verdict, { id: "precheck-verdict", class: "lg", "data-verdict": verdict }),
        checks.length > 0 ? h("span", { class: "muted" }, `${checks.length} checks, ${counts.WARN} WARN, ${counts.FAIL} FAIL`) : null,
      ),
    );
    if (checks.length > 0) {
      container.append(
        h(
          "div",
          { class: "card flush" },
          h(
            "table",
            { class: "table", id: "precheck-table" },
            h("thead", null, h("tr", null, h("th", null, "Check"), h("th", null, "Result"), h("th", null, "Detail"))),
            h(
              "tbody",
              null,
              checks.map((check) =>
                h(
                  "tr",
                  { "data-testid": "precheck-row", "data-verdict": check.verdict },
                  h("td", null, check.check),
                  h("td", null, badge(check.verdict)),
                  h(
                    "td",
                    { class: "detail" },
                    check.detail,
                    Array.isArray(check.nodes) && check.nodes.length > 0
                      ? h("ul", { class: "node-list" }, check.nodes.map((node) => h("li", null, `${node.node}: ${node.verdict} ${node.detail}`)))
                      : null,
                  ),
                ),
              ),
            ),
          ),
        ),
      );
    } else if (precheck.table) {
      container.append(h("pre", { class: "table-text", id: "precheck-table" }, precheck.table));
    }
    show(container, true);
  }

  // ---------------------------------------------------------------- task page

  function renderTask(root, id) {
    const title = h("h1", { id: "task-name" }, id);
    const state = h("span", { class: "badge lg", id: "task-state" }, "…");
    const subtitle = h("div", { class: "subtitle", id: "task-route" });
    const refreshError = h("div", { class: "alert alert-warn", id: "task-refresh-error", role: "alert", hidden: true });
    const failure = h("div", { class: "alert alert-error", id: "task-error", role: "alert", hidden: true });
    const notFound = h(
      "div",
      { class: "card empty", id: "task-not-found", hidden: true },
      `No task "${id}": it does not exist or was canceled. `,
      h("a", { href: "#/" }, "Back to the tasks"),
      ".",
    );

    const stopButton = h("button", { type: "button", class: "button", id: "btn-stop", disabled: true }, "Stop");
    const startButton = h("button", { type: "button", class: "button", id: "btn-start", disabled: true }, "Start");
    const cancelButton = h("button", { type: "button", class: "button danger", id: "btn-cancel", disabled: true }, "Cancel task");
    const actionNote = h("span", { class: "action-note", id: "action-note" });
    const actionError = h("div", { class: "inline-error", id: "action-error", role: "alert", hidden: true });

    const lagValue = h("div", { class: "tile-value", id: "task-lag" }, "—");
    const latencyValue = h("div", { class: "tile-value", id: "task-latency" }, "—");
    const fullSyncBox = h("div", { id: "full-sync" }, h("span", { class: "muted" }, "—"));
    const updatedValue = h("div", { class: "tile-value", id: "task-updated" }, "—");
    const createdNote = h("div", { class: "tile-note", id: "task-created" });

    const partitionRows = h("tbody", { id: "partition-rows" });
    const partitionEmpty = h("div", { class: "empty", id: "partition-empty" });
    const partitionTable = h(
      "table",
      { class: "table", id: "partition-table" },
      h(
        "thead",
        null,
        h(
          "tr",
          null,
          h("th", null, "PartId"),
          h("th", null, "Side"),
          h("th", null, "Sync Status"),
          h("th", { class: "num" }, "LogId Lag"),
          h("th", { class: "num" }, "Time Latency"),
          h("th", null, "Endpoint"),
          h("th", null, "Progress"),
        ),
      ),
      partitionRows,
    );
    const chart = h("div", { class: "charts", id: "lag-chart" });
    const precheckBox = h("div", { id: "task-precheck" }, h("span", { class: "muted" }, "No precheck recorded."));
    const rawStatus = h("pre", { class: "table-text", id: "raw-status" });

    const body = h(
      "div",
      { id: "task-body" },
      h(
        "div",
        { class: "card" },
        h("div", { class: "card-head" }, h("h2", null, "Actions")),
        h("div", { class: "actions" }, stopButton, startButton, cancelButton, actionNote),
        actionError,
      ),
      h(
        "div",
        { class: "grid-tiles" },
        h("div", { class: "tile" }, h("div", { class: "tile-label" }, "LogId lag"), lagValue, h("div", { class: "tile-note" }, "entries not applied yet")),
        h("div", { class: "tile" }, h("div", { class: "tile-label" }, "Time latency"), latencyValue, h("div", { class: "tile-note" }, "back to the oldest of them")),
        h("div", { class: "tile" }, h("div", { class: "tile-label" }, "Full sync"), fullSyncBox),
        h("div", { class: "tile" }, h("div", { class: "tile-label" }, "Updated"), updatedValue, createdNote),
      ),
      h("div", { class: "card flush" }, h("div", { class: "card-head inset" }, h("h2", null, "Partitions")), partitionTable, partitionEmpty),
      h("div", { class: "card" }, h("div", { class: "card-head" }, h("h2", null, "Lag over time"), h("span", { class: "muted" }, "one sample every 2 s, last 10 minutes")), chart),
      h("div", { class: "card" }, h("h2", null, "Last precheck"), precheckBox),
      h("div", { class: "card" }, h("details", { id: "raw-status-details" }, h("summary", null, "Full status (ferry status --json)"), rawStatus)),
    );

    root.append(
      h("div", { class: "crumbs" }, h("a", { href: "#/" }, "Tasks"), ` / ${id}`),
      h("div", { class: "page-head" }, h("div", null, h("div", { class: "title" }, title, state), subtitle)),
      refreshError,
      notFound,
      failure,
      body,
    );
    show(partitionTable, false);

    let view = null;
    let busy = false;

    function updateButtons() {
      const current = view ? view.state : null;
      stopButton.disabled = busy || !view || !RUNNING_STATES.includes(current);
      startButton.disabled = busy || !view || !RESTARTABLE_STATES.includes(current);
      cancelButton.disabled = busy || !view;
    }

    function update(task) {
      view = task;
      title.textContent = task.name || task.id;
      setBadge(state, task.state, "lg");
      state.dataset.state = task.state;
      setChildren(subtitle,
        h("span", { class: "mono" }, task.source),
        h("span", { class: "arrow" }, task.mode === "two-way" ? "⇄" : "→"),
        h("span", { class: "mono" }, task.target),
        h("span", { class: "muted" }, `  ·  ${task.mode || "one-way"}`),
        task.options && task.options.existing_data ? h("span", { class: "muted" }, `  ·  existing data: ${task.options.existing_data}`) : null,
        task.options && task.options.wal_ttl ? h("span", { class: "muted" }, `  ·  WAL TTL ${task.options.wal_ttl}`) : null,
        typeof task.conflicts === "number" ? h("span", { class: "muted", "data-testid": "task-conflicts" }, `  ·  conflicts: ${fmtCount(task.conflicts)}`) : null,
      );
      if (task.error) {
        setChildren(failure, h("div", { class: "alert-title" }, task.state === "FAILED" ? "The task failed" : "Error"), errorText(task.error));
        show(failure, true);
      } else {
        show(failure, false);
      }
      lagValue.textContent = fmtCount(task.lag_entries);
      latencyValue.textContent = fmtMs(task.latency_ms);
      updatedValue.textContent = fmtClock(task.updated_unix_ms);
      createdNote.textContent = `created ${fmtDateTime(task.created_unix_ms)}`;
      renderFullSync(fullSyncBox, task.full_sync, task.state);
      const partitions = Array.isArray(task.partitions) ? task.partitions : [];
      setChildren(partitionRows, ...partitions.map(partitionRow));
      show(partitionTable, partitions.length > 0);
      show(partitionEmpty, partitions.length === 0);
      partitionEmpty.textContent = RUNNING_STATES.includes(task.state)
        ? "No partition yet: the task's stages are starting."
        : `The task is ${String(task.state).toLowerCase()}: none of its stages runs. Start it to resume.`;
      renderLagChart(chart, Array.isArray(task.lag_history) ? task.lag_history : []);
      if (task.precheck) renderPrecheck(precheckBox, task.precheck);
      const status = task.status === undefined ? null : task.status;
      const statusText = JSON.stringify(status, null, 2);
      if (rawStatus.textContent !== statusText) rawStatus.textContent = statusText;
      updateButtons();
    }

    const refresh = poll(async () => {
      const reply = await api("GET", taskPath(id));
      if (reply.status === 404) {
        view = null;
        show(notFound, true);
        show(body, false);
        show(failure, false);
        show(refreshError, false);
        setBadge(state, "NOT FOUND", "lg");
        state.dataset.state = "NOT_FOUND";
        updateButtons();
        return;
      }
      if (!reply.ok) {
        refreshError.textContent = `Could not refresh the task: ${reply.error}. Retrying every 2 s.`;
        show(refreshError, true);
        return;
      }
      show(refreshError, false);
      show(notFound, false);
      show(body, true);
      update(reply.body);
    });

    const actions = {
      stop: {
        title: `Stop task "${id}"?`,
        body: "Its listener and applier stop. The WAL and the target's checkpoint stay, so Start resumes where it stopped; the source sees a replica leave.",
        confirm: "Stop task",
        danger: false,
        method: "POST",
        path: () => `${taskPath(id)}/stop`,
        doing: "Stopping…",
      },
      start: {
        title: `Start task "${id}"?`,
        body: "It resumes from its WAL's offset (a partial resync); a full sync happens only when the source no longer has that offset.",
        confirm: "Start task",
        danger: false,
        method: "POST",
        path: () => `${taskPath(id)}/start`,
        doing: "Starting…",
      },
      cancel: {
        title: `Cancel task "${id}"?`,
        body: `It stops; the keys ferry wrote for it (__ferry:checkpoint:${id}:* and its other __ferry:*:${id} keys), then its WAL and directory are deleted. The replicated data stays on the target. This cannot be undone.`,
        confirm: "Cancel task",
        danger: true,
        method: "DELETE",
        path: () => taskPath(id),
        doing: "Canceling…",
      },
      // After a cancel refused because a server could not be reached.
      forceCancel: {
        title: `Force the cancel of "${id}"?`,
        body: "Its directory and record are deleted even though a server could not be reached: the keys ferry could not delete there are listed afterwards, for you to delete by hand.",
        confirm: "Cancel anyway",
        danger: true,
        method: "DELETE",
        path: () => `${taskPath(id)}?force=true`,
        doing: "Canceling…",
      },
    };

    async function act(kind) {
      const action = actions[kind];
      show(actionError, false);
      const confirmed = await confirmDialog(action);
      if (!confirmed) return;
      busy = true;
      updateButtons();
      actionNote.textContent = action.doing;
      const reply = await api(action.method, action.path());
      busy = false;
      actionNote.textContent = "";
      if (!reply.ok) {
        const forceable = kind === "cancel" && reply.status === 409;
        setChildren(
          actionError,
          `${action.confirm} failed: ${reply.error}`,
          forceable
            ? h("div", null, h("button", { type: "button", class: "button danger", id: "btn-force-cancel", onclick: () => act("forceCancel") }, "Cancel anyway…"))
            : null,
        );
        show(actionError, true);
        updateButtons();
        refresh();
        return;
      }
      if (kind === "cancel" || kind === "forceCancel") {
        const left = reply.body && Array.isArray(reply.body.keys_left) ? reply.body.keys_left : [];
        flash =
          left.length > 0
            ? { warn: true, text: `Task "${id}" canceled, but these keys could not be deleted (delete them by hand): ${left.join(", ")}` }
            : { warn: false, text: `Task "${id}" canceled: its WAL and the keys ferry wrote are deleted; the replicated data stays.` };
        location.hash = "#/";
        return;
      }
      actionNote.textContent = kind === "stop" ? "Stopped." : "Started.";
      refresh();
    }

    stopButton.addEventListener("click", () => act("stop"));
    startButton.addEventListener("click", () => act("start"));
    cancelButton.addEventListener("click", () => act("cancel"));
  }

  function renderFullSync(container, fullSync, state) {
    if (!fullSync) {
      setChildren(
        container,
        h("div", { class: "tile-value muted" }, "—"),
        h(
          "div",
          { class: "tile-note" },
          state === "INCREMENTAL" ? "none in this run: resumed from the WAL" : RUNNING_STATES.includes(state) ? "not started yet" : "not running",
        ),
      );
      return;
    }
    const progress = progressBar(fullSync.bytes_received, fullSync.bytes_total, fullSync.applied, { id: "full-sync-bar" });
    setChildren(container,
      h("div", { class: "tile-value", id: "full-sync-state" }, fullSync.applied ? "applied" : "in progress"),
      progress.bar,
      h("div", { class: "progress-label" }, progress.label),
    );
  }

  /** "listener (source)", "applier (target)"; a two-way task's backward rows read the target and write the source. */
  function sideLabel(partition) {
    const backward = partition.direction === "target-to-source";
    if (partition.side === "listener") return backward ? "listener (target)" : "listener (source)";
    if (partition.side === "drainer") return backward ? "applier (source)" : "applier (target)";
    return partition.side;
  }

  function partitionRow(partition) {
    const listener = partition.side === "listener";
    const endpoint = listener ? partition.source : partition.target;
    const progress = [];
    if (listener) {
      const total = partition.full_sync_bytes_total;
      const received = partition.full_sync_bytes_received;
      if ((typeof received === "number" && received > 0) || (typeof total === "number" && total > 0)) {
        const done = typeof total === "number" && total > 0 && received >= total;
        const bar = progressBar(received, total, done, { "data-testid": "partition-progress" });
        progress.push(bar.bar, h("div", { class: "progress-label" }, `full sync: ${bar.label}`));
      }
      if (typeof partition.last_log_id === "number") {
        progress.push(h("div", { class: "progress-label" }, `received up to #${fmtCount(partition.last_log_id)}`));
      }
    } else {
      const load = partition.snapshot_load;
      if (load && typeof load === "object") {
        const bar = progressBar(load.bytes_loaded, load.rdb_bytes, load.done, { "data-testid": "partition-progress" });
        const keys = typeof load.keys_loaded === "number" ? `, ${fmtCount(load.keys_loaded)} keys` : "";
        progress.push(
          bar.bar,
          h("div", { class: "progress-label" }, load.done ? `snapshot loaded: ${fmtBytes(load.bytes_loaded)}${keys}` : `loading snapshot: ${bar.label}${keys}`),
        );
      }
      if (typeof partition.applied_log_id === "number") {
        progress.push(h("div", { class: "progress-label" }, `applied up to #${fmtCount(partition.applied_log_id)}`));
      }
    }
    const statusCell = h("td", null, badge(partition.sync_status, { "data-testid": "partition-status" }));
    if (partition.error) {
      statusCell.append(h("div", { class: "row-error wrap", "data-testid": "partition-error" }, String(partition.error)));
    }
    return h(
      "tr",
      { "data-testid": "partition-row", "data-side": partition.side, "data-part-id": partition.part_id },
      h("td", { class: "mono" }, String(partition.part_id)),
      h("td", { class: "nowrap", "data-testid": "partition-side" }, sideLabel(partition)),
      statusCell,
      h("td", { class: "num" }, fmtCount(partition.log_id_lag)),
      h("td", { class: "num" }, fmtMs(partition.time_latency_ms)),
      h("td", { class: "endpoint" }, endpoint || "—"),
      h("td", { class: "progress-cell" }, progress.length ? progress : h("span", { class: "muted" }, "—")),
    );
  }

  // ---------------------------------------------------------------- lag chart

  function renderLagChart(container, samples) {
    if (samples.length < 2) {
      setChildren(container, h("div", { class: "empty", id: "lag-chart-empty" }, "Collecting samples: one every 2 s."));
      return;
    }
    setChildren(container,
      lineChart(samples, "lag_entries", "LogId lag (entries)", fmtCount, "lag"),
      lineChart(samples, "latency_ms", "Time latency", fmtMs, "latency"),
    );
  }

  /** A number at least `value` that reads well on an axis (1, 2, 5 × 10^n). */
  function niceCeil(value) {
    if (value <= 0) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  function lineChart(samples, key, label, format, kind) {
    const width = 520;
    const height = 180;
    const left = 64;
    const right = 12;
    const top = 12;
    const bottom = 26;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;
    const times = samples.map((sample) => sample.unix_ms);
    const values = samples.map((sample) => (typeof sample[key] === "number" ? sample[key] : 0));
    const start = Math.min(...times);
    const end = Math.max(...times);
    const span = Math.max(1, end - start);
    // At least 10, so that the middle tick is a whole number.
    const max = niceCeil(Math.max(10, ...values));
    const x = (t) => left + ((t - start) / span) * plotWidth;
    const y = (v) => top + plotHeight - (v / max) * plotHeight;

    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `${label} over time`,
      "data-testid": `chart-${kind}`,
    });
    for (const fraction of [0, 0.5, 1]) {
      const value = max * fraction;
      chart.append(
        svg("line", { class: fraction === 0 ? "axis" : "grid", x1: left, x2: width - right, y1: y(value), y2: y(value) }),
        svg("text", { class: "tick", x: left - 8, y: y(value) + 4, "text-anchor": "end" }, format(Math.round(value))),
      );
    }
    chart.append(
      svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: top + plotHeight }),
      svg("text", { class: "tick", x: left, y: height - 6, "text-anchor": "start" }, fmtClock(start)),
      svg("text", { class: "tick", x: width - right, y: height - 6, "text-anchor": "end" }, fmtClock(end)),
    );
    const points = samples.map((sample, index) => `${x(sample.unix_ms).toFixed(1)},${y(values[index]).toFixed(1)}`);
    chart.append(
      svg("polygon", {
        class: "area",
        points: `${left},${top + plotHeight} ${points.join(" ")} ${x(end).toFixed(1)},${top + plotHeight}`,
      }),
      svg("polyline", { class: "line", points: points.join(" ") }),
    );
    const last = values[values.length - 1];
    return h(
      "figure",
      { class: `chart ${kind}` },
      h("h3", null, `${label}: now ${format(last)}, peak ${format(Math.max(...values))}`),
      chart,
    );
  }

  // ---------------------------------------------------------------- start

  installModal();
  window.addEventListener("hashchange", route);
  route();
})();
