// Drives the real ComfyUI frontend (served by a running ComfyUI) in headless Chromium, for the workflow
// tests and for build_workflows.py. One browser and one page serve every request.
//
//   node tests/workflows/frontend.js http://127.0.0.1:8188
//
// Protocol: one JSON object per line on stdin, one JSON answer per line on stdout ({"ok": true, ...} or
// {"ok": false, "error": "..."}); the first line out is {"ok": true, "ready_ms": ...} once the page is up.
//   {"cmd": "check", "workflow": {...}}  load a saved (UI-format) workflow as a user would, report
//       each node (type, registered, has_errors, widgets by name), the missing-nodes dialog, page errors,
//       and the API prompt from the frontend's own app.graphToPrompt()
//   {"cmd": "create", "types": ["NodeType", ...]}  add new nodes of these types to an empty graph, as a user
//       does from the node library, and report their widgets by name
//   {"cmd": "build", "prompt": {...}, "columns": [[id, ...], ...], "sizes": {id: [w, h or null]},
//    "colors": {id: [color, bgcolor]}, "widgets": {id: {name: value}}, "models": {id: [{name, url, directory}]},
//    "note": {"title", "text", "width"}, "thumbnail": "out.jpg"}
//       load an API prompt with app.loadApiJson(), set widgets an API prompt cannot hold (such as a seed's
//       control_after_generate), lay the nodes out in columns (left to right, stacked
//       top to bottom), record the download links of model files as ComfyUI's templates do
//       (properties.models), add a MarkdownNote at the far left, screenshot the canvas to a JPEG, and return
//       app.graph.serialize(): what the frontend saves
//
// playwright-core comes from .frontend/ (scripts/setup_frontend.sh); the browser is PID_CHROMIUM or
// chromium on PATH.
'use strict';
const path = require('path');
const fs = require('fs');
const readline = require('readline');

const ROOT = path.resolve(__dirname, '..', '..');
const { chromium } = require(path.join(ROOT, '.frontend', 'node_modules', 'playwright-core'));

const VIEWPORT = { width: 1600, height: 1000 };
const COLUMN_GAP = 60;
const ROW_GAP = 50; // room for the next node's title bar
const MARGIN = 40;
// Settings for the page (stored in the server's user folder): no minimap or canvas statistics, and full
// detail at any zoom, so that thumbnails show the whole graph legibly.
const SETTINGS = {
  'Comfy.Minimap.Visible': false,
  'Comfy.Graph.CanvasInfo': false,
  'LiteGraph.Canvas.MinFontSizeForLOD': 0,
};

function findChromium() {
  if (process.env.PID_CHROMIUM) return process.env.PID_CHROMIUM;
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    for (const name of ['chromium', 'chromium-browser', 'google-chrome']) {
      const candidate = path.join(dir, name);
      if (fs.existsSync(candidate)) return candidate;
    }
  }
  throw new Error('no chromium on PATH: run scripts/setup_frontend.sh (or set PID_CHROMIUM)');
}

async function openPage(url) {
  const browser = await chromium.launch({
    executablePath: findChromium(),
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: VIEWPORT });
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e.message || e)));
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await appReady(page);
  const changed = await page.evaluate(async (settings) => {
    const store = window.app.extensionManager.setting;
    const changed = Object.entries(settings).filter(([id, value]) => store.get(id) !== value);
    for (const [id, value] of changed) await store.set(id, value);
    return changed.length > 0;
  }, SETTINGS);
  if (changed) {
    // Stored on the server, they take full effect at the next start: changed at run time, current frontends leave
    // DOM widgets (the note's text) unplaced on the first graph.
    await page.reload({ waitUntil: 'domcontentloaded' });
    await appReady(page);
  }
  return { browser, page, pageErrors };
}

// window.app is the ComfyApp; the graph exists and node types are registered once setup() is done.
async function appReady(page) {
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph &&
    Object.keys(window.LiteGraph.registered_node_types).length > 100, null, { timeout: 120000 });
}

// Closes whatever dialogs a load opened (missing nodes or models), returning their text.
async function closeDialogs(page) {
  const texts = [];
  for (let i = 0; i < 10; i++) {
    const open = await page.locator('.p-dialog').count();
    if (!open) break;
    const dialog = page.locator('.p-dialog').nth(open - 1); // the top one: its mask covers those below
    texts.push(await dialog.innerText());
    await dialog.locator('.p-dialog-close-button, button[aria-label="Close"]').first().click();
    await page.waitForFunction((n) => document.querySelectorAll('.p-dialog').length < n, open, { timeout: 5000 });
  }
  return texts;
}

async function check(state, { workflow }) {
  const { page, pageErrors } = state;
  pageErrors.length = 0;
  const loaded = await page.evaluate(async (wf) => {
    const app = window.app;
    await app.loadGraphData(wf, true, true, 'check');
    const registered = window.LiteGraph.registered_node_types;
    const nodes = app.graph.nodes.map((n) => ({
      id: n.id, type: n.type, title: n.title, mode: n.mode, registered: !!registered[n.type],
      has_errors: !!n.has_errors,
      widgets: (n.widgets || []).map((w) => [w.name, w.value === undefined ? null : w.value]),
    }));
    let prompt = null;
    let promptError = null;
    try {
      prompt = (await app.graphToPrompt()).output;
    } catch (e) {
      promptError = String(e && e.stack || e);
    }
    return { nodes, prompt, promptError };
  }, workflow);
  const dialogs = await closeDialogs(page);
  return { ...loaded, dialogs, pageErrors: [...pageErrors] };
}

async function create(state, { types }) {
  // new nodes as a user adds them from the node library: created by LiteGraph, added to an empty graph
  const { page } = state;
  return page.evaluate(async (names) => {
    const app = window.app;
    app.graph.clear();
    const nodes = names.map((type) => {
      const node = window.LiteGraph.createNode(type);
      app.graph.add(node);
      return { type, widgets: (node.widgets || []).map((w) => [w.name, w.value === undefined ? null : w.value]) };
    });
    return { nodes };
  }, types);
}

async function build(state, request) {
  const { page } = state;
  await page.evaluate(async (req) => {
    const app = window.app;
    const LiteGraph = window.LiteGraph;
    await app.loadApiJson(req.prompt, req.name || 'workflow'); // async in current frontends
    const graph = app.graph;
    const byId = (id) => {
      const node = graph.getNodeById(Number(id));
      if (!node) throw new Error(`node ${id} of the layout is not in the graph`);
      return node;
    };
    for (const [id, [width, height]] of Object.entries(req.sizes || {})) {
      const node = byId(id);
      node.setSize([width, height ?? node.size[1]]);
    }
    for (const [id, [color, bgcolor]] of Object.entries(req.colors || {})) {
      Object.assign(byId(id), { color, bgcolor });
    }
    for (const [id, values] of Object.entries(req.widgets || {})) {
      const node = byId(id);
      for (const [name, value] of Object.entries(values)) {
        const widget = (node.widgets || []).find((w) => w.name === name);
        if (!widget) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
        widget.value = value;
      }
    }
    for (const [id, models] of Object.entries(req.models || {})) byId(id).properties.models = models;

    const note = LiteGraph.createNode('MarkdownNote');
    if (!note) throw new Error('the frontend has no MarkdownNote node');
    note.title = req.note.title;
    graph.add(note);
    note.widgets[0].value = req.note.text;
    note.setSize([req.note.width, 200]);
    // As tall as its rendered text, measured once the frontend has laid the text out at the note's width (on a
    // later frame: before that, current frontends lay it out at the page's width).
    const element = note.widgets[0].element;
    let rendered = null;
    for (let i = 0; i < 50 && !rendered; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      const text = element?.querySelector('.ProseMirror');
      if (text && element.clientWidth > 0 && element.clientWidth <= req.note.width) rendered = text;
    }
    if (!rendered) throw new Error("the note's text was not laid out at the note's width within 5 s");
    note.setSize([req.note.width, rendered.scrollHeight + 30]);

    const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
    let x = 0;
    for (const column of [[note.id], ...req.columns]) {
      const nodes = column.map((id) => (id === note.id ? note : byId(id)));
      let y = titleHeight;
      for (const node of nodes) {
        node.pos = [x, y];
        y += node.size[1] + titleHeight + req.rowGap;
      }
      x += Math.max(...nodes.map((n) => n.size[0])) + req.columnGap;
    }
    // compared as strings: current frontends give node ids as strings
    const placed = new Set([String(note.id), ...req.columns.flat().map(String)]);
    const unplaced = graph.nodes.filter((n) => !placed.has(String(n.id))).map((n) => `${n.id} ${n.type}`);
    if (unplaced.length) throw new Error(`nodes missing from the layout: ${unplaced.join(', ')}`);
    graph.setDirtyCanvas(true, true);
  }, { ...request, rowGap: ROW_GAP, columnGap: COLUMN_GAP });
  await thumbnail(page, request.thumbnail);
  // Saved after the thumbnail, so that the view it stores (extra.ds) is the fitted one.
  return { workflow: await page.evaluate(() => window.app.graph.serialize()) };
}

// The graph fitted into the viewport with the menus hidden (focus mode), cut to the graph, as a JPEG.
async function thumbnail(page, file) {
  const focus = await page.evaluate(() => window.app.extensionManager.workspace?.focusMode);
  if (!focus) await page.evaluate(() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode'));
  await page.waitForTimeout(300);
  const clip = await page.evaluate(async ({ margin }) => {
    const canvas = window.app.canvas;
    const nodes = window.app.graph.nodes;
    const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
    const left = Math.min(...nodes.map((n) => n.pos[0]));
    const top = Math.min(...nodes.map((n) => n.pos[1] - titleHeight));
    const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const rect = canvas.canvas.getBoundingClientRect();
    const scale = Math.min((rect.width - 2 * margin) / (right - left), (rect.height - 2 * margin) / (bottom - top), 1);
    canvas.ds.scale = scale;
    canvas.ds.offset = [margin / scale - left, (rect.height - (bottom - top) * scale) / 2 / scale - top];
    canvas.deselectAll?.();
    canvas.setDirty(true, true);
    canvas.draw(true, true);
    const toScreen = (x, y) => [rect.left + (x + canvas.ds.offset[0]) * scale, rect.top + (y + canvas.ds.offset[1]) * scale];
    const [x0, y0] = toScreen(left, top);
    const [x1, y1] = toScreen(right, bottom);
    return { x: Math.max(0, x0 - margin), y: Math.max(0, y0 - margin), width: x1 - x0 + 2 * margin, height: y1 - y0 + 2 * margin };
  }, { margin: MARGIN });
  await page.waitForTimeout(500); // DOM widgets (text boxes, the note) follow the canvas on the next frames
  await page.screenshot({ path: file, type: 'jpeg', quality: 85, clip });
  await page.evaluate(() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode'));
}

async function main() {
  const url = process.argv[2];
  if (!url) throw new Error('usage: node frontend.js <ComfyUI url>');
  const started = Date.now();
  const state = await openPage(url);
  const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
  out({ ok: true, ready_ms: Date.now() - started });
  const handlers = { check, create, build };
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let request;
    try {
      request = JSON.parse(line);
      if (request.cmd === 'close') break;
      const handler = handlers[request.cmd];
      if (!handler) throw new Error(`unknown command ${request.cmd}`);
      out({ ok: true, ...(await handler(state, request)) });
    } catch (e) {
      out({ ok: false, error: String(e && e.stack || e) });
    }
  }
  await state.browser.close();
  process.exit(0); // stdin may still be open: don't wait for it
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.stack || e) }) + '\n');
  process.exit(1);
});
