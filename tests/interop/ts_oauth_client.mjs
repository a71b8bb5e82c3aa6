// The TypeScript SDK client with an OAuth authProvider, logging in headlessly; driven by
// tests/interop/test_ts_oauth.py.
//
// Usage: node ts_oauth_client.mjs URL
// Env:   INTEROP_NODE_MODULES = the node_modules directory holding @modelcontextprotocol/sdk.
//
// The provider keeps everything in memory. Its redirectToAuthorization follows the authorization URL
// hop by hop (fetch with redirect: "manual", as a browser would follow 302s) until it reaches the
// redirect URL, and keeps the code; the script then calls transport.finishAuth(code) and connects
// again. Then: one `whoami` call, a "ready" line, one line read from stdin (the harness restarts the
// upstream and lets the access token expire meanwhile), one `echo` call on the same session.
// With TS_OAUTH_BROWSER=stdin (an authorization server with sign-in pages), redirectToAuthorization
// prints {"step": "authorize", "url": ...} instead and reads the address the browser ended on (the
// redirect URL with the code) from stdin.
// Every outcome is one JSON line: {"step": ..., "text"|"error": ..., "session": ...}; the last line,
// {"step": "auth", "logins": N, "tokens_saved": M}, counts authorizations and token answers
// (a refresh saves tokens without a login). Exit status 0 only when both calls returned their text.
import { createInterface } from "node:readline";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const CALL_TIMEOUT_MS = 15000;
const MAX_HOPS = 5;
const REDIRECT_URL = "http://127.0.0.1:9/callback"; // never dialed: the code is read off the redirect

const modules = process.env.INTEROP_NODE_MODULES;
if (!modules) {
  console.error("INTEROP_NODE_MODULES is not set");
  process.exit(2);
}
const sdk = (path) => import(pathToFileURL(join(modules, "@modelcontextprotocol/sdk/dist/esm", path)).href);
const { Client } = await sdk("client/index.js");
const { StreamableHTTPClientTransport } = await sdk("client/streamableHttp.js");
const { UnauthorizedError } = await sdk("client/auth.js");

const url = new URL(process.argv[2]);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (record) => process.stdout.write(JSON.stringify(record) + "\n");

async function followToRedirect(authorizationUrl) {
  let next = authorizationUrl.toString();
  for (let hop = 0; hop < MAX_HOPS; hop++) {
    if (next.startsWith(REDIRECT_URL)) {
      return new URL(next);
    }
    const response = await fetch(next, { redirect: "manual", signal: AbortSignal.timeout(10000) });
    const location = response.headers.get("location");
    if (response.status < 300 || response.status >= 400 || !location) {
      throw new Error(`authorization stopped at ${response.status}: ${await response.text()}`);
    }
    next = new URL(location, next).toString();
  }
  throw new Error("authorization redirected too many times");
}

async function askTheHarness(authorizationUrl) {
  say({ step: "authorize", url: authorizationUrl.toString() });
  const { value } = await lines.next();
  return new URL(value.trim());
}

const counts = { logins: 0, tokens_saved: 0 };
let pendingCode;
const memory = {};
const authProvider = {
  get redirectUrl() {
    return REDIRECT_URL;
  },
  get clientMetadata() {
    return {
      client_name: "interop-ts-oauth-client",
      redirect_uris: [REDIRECT_URL],
      grant_types: ["authorization_code", "refresh_token"],
      response_types: ["code"],
    };
  },
  clientInformation: () => memory.client,
  saveClientInformation: (info) => {
    memory.client = info;
  },
  tokens: () => memory.tokens,
  saveTokens: (tokens) => {
    counts.tokens_saved += 1;
    memory.tokens = tokens;
  },
  saveCodeVerifier: (verifier) => {
    memory.verifier = verifier;
  },
  codeVerifier: () => memory.verifier,
  redirectToAuthorization: async (authorizationUrl) => {
    counts.logins += 1;
    const callback =
      process.env.TS_OAUTH_BROWSER === "stdin"
        ? await askTheHarness(authorizationUrl)
        : await followToRedirect(authorizationUrl);
    pendingCode = callback.searchParams.get("code");
    if (!pendingCode) {
      throw new Error(`authorization refused: ${callback.search}`);
    }
  },
};

async function connect() {
  for (let attempt = 0; attempt < 2; attempt++) {
    const client = new Client({ name: "interop-ts-oauth-client", version: "1.0.0" });
    const transport = new StreamableHTTPClientTransport(url, { authProvider });
    try {
      await client.connect(transport);
      return { client, transport };
    } catch (error) {
      if (!(error instanceof UnauthorizedError) || !pendingCode) {
        throw error;
      }
      await transport.finishAuth(pendingCode);
      pendingCode = undefined;
    }
  }
  throw new Error("still unauthorized after logging in");
}

async function call(client, name, args) {
  const result = await client.callTool({ name, arguments: args }, undefined, { timeout: CALL_TIMEOUT_MS });
  if (result.isError) {
    throw new Error(`tool error: ${JSON.stringify(result.content)}`);
  }
  return result.content[0].text;
}

let status = 0;
let session;
try {
  session = await connect();
  const { client, transport } = session;
  say({ step: "first", text: await call(client, "whoami", {}), session: transport.sessionId });
  say({ step: "ready" });
  await lines.next(); // the harness restarted the upstream and let the token expire
  try {
    say({ step: "second", text: await call(client, "echo", { text: "after" }), session: transport.sessionId });
  } catch (error) {
    say({ step: "second", error: String(error?.message ?? error), session: transport.sessionId });
    status = 1;
  }
} catch (error) {
  say({ step: "setup", error: String(error?.message ?? error) });
  status = 1;
}
say({ step: "auth", ...counts });
try {
  await session?.client.close();
} catch {
  // A failed close of a dead session does not change the outcome.
}
process.exit(status);
