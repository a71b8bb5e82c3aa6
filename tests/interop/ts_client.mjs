// The TypeScript SDK client (StreamableHTTPClientTransport), driven by tests/interop/test_ts_client.py.
//
// Usage: node ts_client.mjs URL [ARGUMENT]
//        ARGUMENT names the echo tool's text argument: "text" (default, tests/upstream_server.py) or
//        "message" (server-everything).
// Env:   INTEROP_NODE_MODULES = the node_modules directory holding @modelcontextprotocol/sdk.
//        INTEROP_STDIO_COMMAND = a JSON array [command, ...args]: when set, the client launches that
//        command and speaks the stdio transport to it (StdioClientTransport) instead of HTTP to URL.
//
// One client session, two `echo` tool calls. Between them the script prints a "ready" line and waits
// for one line on stdin: the harness restarts the upstream meanwhile. Every outcome is one JSON line on
// stdout: {"step": "first"|"second", "text": ...} or {"step": ..., "error": ...}. Exit status 0 only
// when both calls returned their text.
import { createInterface } from "node:readline";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const CALL_TIMEOUT_MS = 15000;

const modules = process.env.INTEROP_NODE_MODULES;
if (!modules) {
  console.error("INTEROP_NODE_MODULES is not set");
  process.exit(2);
}
const sdk = (path) => import(pathToFileURL(join(modules, "@modelcontextprotocol/sdk/dist/esm", path)).href);
const { Client } = await sdk("client/index.js");
const { StreamableHTTPClientTransport } = await sdk("client/streamableHttp.js");
const { StdioClientTransport } = await sdk("client/stdio.js");

const url = process.argv[2];
const argument = process.argv[3] ?? "text";
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (record) => process.stdout.write(JSON.stringify(record) + "\n");

async function echo(client, text) {
  const result = await client.callTool({ name: "echo", arguments: { [argument]: text } }, undefined, {
    timeout: CALL_TIMEOUT_MS,
  });
  if (result.isError) {
    throw new Error(`tool error: ${JSON.stringify(result.content)}`);
  }
  return result.content[0].text;
}

const client = new Client({ name: "interop-ts-client", version: "1.0.0" });
const stdioCommand = process.env.INTEROP_STDIO_COMMAND ? JSON.parse(process.env.INTEROP_STDIO_COMMAND) : null;
const transport = stdioCommand
  ? new StdioClientTransport({ command: stdioCommand[0], args: stdioCommand.slice(1), stderr: "inherit" })
  : new StreamableHTTPClientTransport(new URL(url));
let status = 0;
try {
  await client.connect(transport);
  say({ step: "first", text: await echo(client, "before"), session: transport.sessionId });
  say({ step: "ready" });
  await lines.next(); // the harness restarted the upstream
  try {
    say({ step: "second", text: await echo(client, "after"), session: transport.sessionId });
  } catch (error) {
    say({ step: "second", error: String(error?.message ?? error), session: transport.sessionId });
    status = 1;
  }
} catch (error) {
  say({ step: "setup", error: String(error?.message ?? error) });
  status = 1;
}
try {
  await client.close();
} catch {
  // A failed close of a dead session does not change the outcome.
}
process.exit(status);
