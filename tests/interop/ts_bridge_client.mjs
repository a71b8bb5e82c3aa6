// The TypeScript SDK client (a handshake-era client) against a 2026-07-28-only server, driven by
// tests/interop/test_bridge_clients.py.
//
// Usage: node ts_bridge_client.mjs URL
// Env:   INTEROP_NODE_MODULES = the node_modules directory holding @modelcontextprotocol/sdk.
//        INTEROP_STDIO_COMMAND = a JSON array [command, ...args]: launch it and speak stdio instead.
//
// One session, the same checks twice ("before" and "after"): list tools, call echo, call steps with
// progress and log messages at level debug, answer an elicitation (ask_name), call add_tool and wait
// for notifications/tools/list_changed. Between the rounds it prints {"step": "ready"} and waits for one
// line on stdin (the harness restarts the upstream or the proxy). Each check is one JSON line:
// {"step": NAME, "ok": true, ...} or {"step": NAME, "error": ...}. Exit status 0 only if all passed.
import { createInterface } from "node:readline";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const CALL_TIMEOUT_MS = 15000;
const LIST_CHANGED_TIMEOUT_MS = 10000;

const modules = process.env.INTEROP_NODE_MODULES;
if (!modules) {
  console.error("INTEROP_NODE_MODULES is not set");
  process.exit(2);
}
const sdk = (path) => import(pathToFileURL(join(modules, "@modelcontextprotocol/sdk/dist/esm", path)).href);
const { Client } = await sdk("client/index.js");
const { StreamableHTTPClientTransport } = await sdk("client/streamableHttp.js");
const { StdioClientTransport } = await sdk("client/stdio.js");
const { ElicitRequestSchema, LoggingMessageNotificationSchema, ToolListChangedNotificationSchema } =
  await sdk("types.js");

const url = process.argv[2];
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (record) => process.stdout.write(JSON.stringify(record) + "\n");
const options = { timeout: CALL_TIMEOUT_MS };

const logs = [];
const elicited = [];
let listChanged = null;

const client = new Client({ name: "interop-ts-bridge-client", version: "1.0.0" }, { capabilities: { elicitation: {} } });
client.setRequestHandler(ElicitRequestSchema, async (request) => {
  elicited.push(request.params.message);
  return { action: "accept", content: { name: "Ada" } };
});
client.setNotificationHandler(LoggingMessageNotificationSchema, (notification) => {
  logs.push(notification.params.data);
});
client.setNotificationHandler(ToolListChangedNotificationSchema, () => {
  if (listChanged) listChanged();
});

async function check(step, run) {
  try {
    say({ step, ok: true, ...(await run()) });
    return true;
  } catch (error) {
    say({ step, error: String(error?.message ?? error) });
    return false;
  }
}

async function round(name) {
  let ok = true;
  ok &&= await check(`${name}:tools`, async () => {
    const names = (await client.listTools(undefined, options)).tools.map((tool) => tool.name);
    if (!names.includes("ask_name")) throw new Error(`tools: ${names}`);
    return { names };
  });
  ok &&= await check(`${name}:echo`, async () => {
    const result = await client.callTool({ name: "echo", arguments: { text: name } }, undefined, options);
    if (result.content[0].text !== name) throw new Error(JSON.stringify(result));
    return {};
  });
  ok &&= await check(`${name}:progress_and_logs`, async () => {
    await client.setLoggingLevel("debug", options);
    const progress = [];
    logs.length = 0;
    await client.callTool({ name: "steps", arguments: { count: 2 } }, undefined, {
      ...options,
      onprogress: (p) => progress.push(p.progress),
    });
    if (progress.join() !== "1,2") throw new Error(`progress: ${progress}`);
    if (logs.join() !== "did step 1,did step 2") throw new Error(`logs: ${logs}`);
    return { progress, logs };
  });
  ok &&= await check(`${name}:elicitation`, async () => {
    const result = await client.callTool({ name: "ask_name", arguments: {} }, undefined, options);
    if (result.content[0].text !== "hello Ada" || elicited.length === 0) throw new Error(JSON.stringify(result));
    return {};
  });
  ok &&= await check(`${name}:list_changed`, async () => {
    const changed = new Promise((resolve, reject) => {
      listChanged = resolve;
      setTimeout(() => reject(new Error("no notifications/tools/list_changed")), LIST_CHANGED_TIMEOUT_MS);
    });
    await client.callTool({ name: "add_tool", arguments: {} }, undefined, options);
    await changed;
    return {};
  });
  return ok;
}

const stdioCommand = process.env.INTEROP_STDIO_COMMAND ? JSON.parse(process.env.INTEROP_STDIO_COMMAND) : null;
const transport = stdioCommand
  ? new StdioClientTransport({ command: stdioCommand[0], args: stdioCommand.slice(1), stderr: "inherit", env: process.env })
  : new StreamableHTTPClientTransport(new URL(url));
let status = 0;
try {
  await client.connect(transport);
  say({ step: "connected", ok: true, version: client.getServerVersion()?.name });
  if (!(await round("before"))) status = 1;
  say({ step: "ready" });
  await lines.next();
  if (!(await round("after"))) status = 1;
} catch (error) {
  say({ step: "setup", error: String(error?.message ?? error) });
  status = 1;
}
try {
  await client.close();
} catch {
  // A failed close does not change the outcome.
}
process.exit(status);
