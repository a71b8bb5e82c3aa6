// Runs the TypeScript SDK's example server (simpleStreamableHttp.js) with its demo OAuth authorization
// server, on 127.0.0.1 only.
//
// Usage: node ts_oauth_server.mjs MCP_PORT AUTH_PORT [--oauth-strict]
// Env:   INTEROP_NODE_MODULES = the node_modules directory holding @modelcontextprotocol/sdk.
//
// The example calls `app.listen(PORT)` for both servers, which binds every interface; this launcher pins
// any numeric listen() to 127.0.0.1 and then loads the example unchanged. The example names itself
// `http://localhost:PORT`, so run node with --dns-result-order=ipv4first (its own token introspection
// goes to localhost). Its authorization server approves every request, registers clients dynamically,
// issues one-hour tokens without refresh tokens, and with --oauth-strict refuses a `resource` other
// than the MCP server's own URL and tokens issued for another.
import net from "node:net";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.INTEROP_NODE_MODULES;
const [mcpPort, authPort, ...flags] = process.argv.slice(2);
if (!modules || !mcpPort || !authPort) {
  console.error("usage: INTEROP_NODE_MODULES=DIR node ts_oauth_server.mjs MCP_PORT AUTH_PORT [--oauth-strict]");
  process.exit(2);
}

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || (typeof args[0] === "string" && /^\d+$/.test(args[0]))) {
    const callback = args.find((arg) => typeof arg === "function");
    return callback === undefined
      ? listen.call(this, Number(args[0]), "127.0.0.1")
      : listen.call(this, Number(args[0]), "127.0.0.1", callback);
  }
  return listen.apply(this, args);
};

process.env.MCP_PORT = mcpPort;
process.env.MCP_AUTH_PORT = authPort;
process.argv = [process.argv[0], process.argv[1], "--oauth", ...flags];
await import(
  pathToFileURL(join(modules, "@modelcontextprotocol/sdk/dist/esm/examples/server/simpleStreamableHttp.js")).href
);
