// Runs @modelcontextprotocol/server-everything in its streamable HTTP mode on 127.0.0.1 only.
//
// Usage: node everything_server.mjs PORT
// Env:   INTEROP_NODE_MODULES = the node_modules directory holding the package.
//
// The package's own entry point calls `app.listen(PORT)`, which binds every interface. This launcher
// pins any numeric listen() to 127.0.0.1 before loading the package's transport module unchanged.
import net from "node:net";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.INTEROP_NODE_MODULES;
const port = process.argv[2];
if (!modules || !port) {
  console.error("usage: INTEROP_NODE_MODULES=DIR node everything_server.mjs PORT");
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

process.env.PORT = port;
await import(
  pathToFileURL(join(modules, "@modelcontextprotocol/server-everything/dist/transports/streamableHttp.js")).href
);
