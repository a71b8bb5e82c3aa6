// An MCP server for the official conformance suite's server scenarios (`conformance server --url`),
// written to the requirements each scenario states (`conformance list`, the scenarios' descriptions), on
// the pinned TypeScript SDK's streamable HTTP transport. The suite ships no server of its own.
//
// Usage: CONFORMANCE_NODE_MODULES=DIR node everything_server.mjs
// Listens on 127.0.0.1, on a free port, and prints "listening on http://127.0.0.1:PORT/mcp".
//
// Like the suite's reference server, the tools that ask the client something (sampling, elicitation)
// send their request with the server's own `request()`, unrelated to the tool call: the transport puts
// it on the session's GET stream, and drops it when no GET stream is open at that moment. A client opens
// its GET stream at the same time as its first tool call, so these scenarios pass only when the GET
// stream is open upstream before the call arrives.
import http from "node:http";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import zlib from "node:zlib";

const modules = process.env.CONFORMANCE_NODE_MODULES;
if (!modules) {
  console.error("usage: CONFORMANCE_NODE_MODULES=DIR node everything_server.mjs");
  process.exit(2);
}
const sdk = (path) => import(pathToFileURL(join(modules, "@modelcontextprotocol/sdk/dist/esm", path)).href);
const { Server } = await sdk("server/index.js");
const { StreamableHTTPServerTransport } = await sdk("server/streamableHttp.js");
const types = await sdk("types.js");

// A 1x1 PNG and a WAV file without samples: the scenarios check types and fields, not pictures or sound.
function chunk(type, data) {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, "latin1");
  data.copy(out, 8);
  out.writeUInt32BE(zlib.crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}
function onePixelPng() {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(1, 0); // width
  header.writeUInt32BE(1, 4); // height
  header.writeUInt8(8, 8); // bit depth
  header.writeUInt8(2, 9); // truecolour
  const row = Buffer.from([0, 255, 0, 0]); // filter byte, then one red pixel
  const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  const parts = [signature, chunk("IHDR", header), chunk("IDAT", zlib.deflateSync(row)), chunk("IEND", Buffer.alloc(0))];
  return Buffer.concat(parts).toString("base64");
}
function silentWav() {
  const header = Buffer.alloc(44);
  header.write("RIFF", 0);
  header.writeUInt32LE(36, 4);
  header.write("WAVEfmt ", 8);
  header.writeUInt32LE(16, 16); // fmt chunk size
  header.writeUInt16LE(1, 20); // PCM
  header.writeUInt16LE(1, 22); // mono
  header.writeUInt32LE(8000, 24); // samples per second
  header.writeUInt32LE(16000, 28); // bytes per second
  header.writeUInt16LE(2, 32); // block align
  header.writeUInt16LE(16, 34); // bits per sample
  header.write("data", 36);
  header.writeUInt32LE(0, 40);
  return header.toString("base64");
}
const PNG = onePixelPng();
const WAV = silentWav();
const LOG_LEVELS = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const text = (value) => ({ content: [{ type: "text", text: value }] });
const noArguments = { type: "object", properties: {} };

const TOOLS = [
  ["test_simple_text", "Returns one text item", noArguments],
  ["test_image_content", "Returns an image", noArguments],
  ["test_audio_content", "Returns audio", noArguments],
  ["test_embedded_resource", "Returns an embedded resource", noArguments],
  ["test_multiple_content_types", "Returns text, an image and a resource", noArguments],
  ["test_tool_with_logging", "Sends three log notifications while it runs", noArguments],
  ["test_error_handling", "Always fails", noArguments],
  ["test_tool_with_progress", "Reports progress while it runs", noArguments],
  [
    "test_sampling",
    "Asks the client for a completion",
    { type: "object", properties: { prompt: { type: "string" } }, required: ["prompt"] },
  ],
  [
    "test_elicitation",
    "Asks the user for information",
    { type: "object", properties: { message: { type: "string" } }, required: ["message"] },
  ],
  ["test_elicitation_sep1034_defaults", "Asks the user, with defaults (SEP-1034)", noArguments],
  ["test_elicitation_sep1330_enums", "Asks the user to pick from enums (SEP-1330)", noArguments],
].map(([name, description, inputSchema]) => ({ name, description, inputSchema }));

const SEP1034_SCHEMA = {
  type: "object",
  properties: {
    name: { type: "string", default: "John Doe" },
    age: { type: "integer", default: 30 },
    score: { type: "number", default: 95.5 },
    status: { type: "string", enum: ["active", "inactive", "pending"], default: "active" },
    verified: { type: "boolean", default: true },
  },
};
const titled = (values, titles) => values.map((value, i) => ({ const: value, title: titles[i] }));
const SEP1330_SCHEMA = {
  type: "object",
  properties: {
    untitledSingle: { type: "string", enum: ["option1", "option2", "option3"] },
    titledSingle: {
      type: "string",
      oneOf: titled(["value1", "value2", "value3"], ["First Option", "Second Option", "Third Option"]),
    },
    legacyEnum: { type: "string", enum: ["opt1", "opt2", "opt3"], enumNames: ["Option One", "Option Two", "Option Three"] },
    untitledMulti: { type: "array", items: { type: "string", enum: ["option1", "option2", "option3"] } },
    titledMulti: {
      type: "array",
      items: { anyOf: titled(["value1", "value2", "value3"], ["First Choice", "Second Choice", "Third Choice"]) },
    },
  },
};

const RESOURCES = {
  "test://static-text": { name: "static-text", mimeType: "text/plain", text: "This is the content of the static text resource." },
  "test://static-binary": { name: "static-binary", mimeType: "image/png", blob: PNG },
  "test://watched-resource": { name: "watched-resource", mimeType: "text/plain", text: "Watched resource content" },
};
const TEMPLATE = /^test:\/\/template\/([^/]+)\/data$/;

const PROMPTS = [
  { name: "test_simple_prompt", description: "A prompt without arguments" },
  {
    name: "test_prompt_with_arguments",
    description: "A prompt with two arguments",
    arguments: [
      { name: "arg1", description: "First argument", required: true },
      { name: "arg2", description: "Second argument", required: true },
    ],
  },
  {
    name: "test_prompt_with_embedded_resource",
    description: "A prompt that embeds a resource",
    arguments: [{ name: "resourceUri", description: "The resource to embed", required: true }],
  },
  { name: "test_prompt_with_image", description: "A prompt with an image" },
];

function newServer() {
  const server = new Server(
    { name: "mcp-heal-proxy-conformance-server", version: "1.0.0" },
    {
      capabilities: {
        tools: {},
        resources: { subscribe: true },
        prompts: {},
        logging: {},
        completions: {},
      },
    },
  );
  let logLevel = "debug";
  const subscriptions = new Set();
  const log = async (extra, level, data) => {
    if (LOG_LEVELS.indexOf(level) >= LOG_LEVELS.indexOf(logLevel)) {
      await extra.sendNotification({ method: "notifications/message", params: { level, data } });
    }
  };
  // The server's own request, unrelated to the call that caused it: it goes out on the GET stream.
  const ask = async (capability, method, params, schema) => {
    if (!server.getClientCapabilities()?.[capability]) {
      throw new Error(`the client does not support ${capability}`);
    }
    return await server.request({ method, params }, schema);
  };
  const elicit = async (message, requestedSchema) => {
    const result = await ask("elicitation", "elicitation/create", { message, requestedSchema }, types.ElicitResultSchema);
    return text(`Elicitation completed: action=${result.action}, content=${JSON.stringify(result.content ?? {})}`);
  };

  server.setRequestHandler(types.SetLevelRequestSchema, async (request) => {
    logLevel = request.params.level;
    return {};
  });
  server.setRequestHandler(types.CompleteRequestSchema, async (request) => {
    const values = ["paris", "park", "party"].filter((value) => value.startsWith(request.params.argument.value));
    return { completion: { values, total: values.length, hasMore: false } };
  });
  server.setRequestHandler(types.ListToolsRequestSchema, async () => ({ tools: TOOLS }));
  server.setRequestHandler(types.CallToolRequestSchema, async (request, extra) => {
    const args = request.params.arguments ?? {};
    switch (request.params.name) {
      case "test_simple_text":
        return text("This is a simple text response for testing.");
      case "test_image_content":
        return { content: [{ type: "image", data: PNG, mimeType: "image/png" }] };
      case "test_audio_content":
        return { content: [{ type: "audio", data: WAV, mimeType: "audio/wav" }] };
      case "test_embedded_resource":
        return {
          content: [
            {
              type: "resource",
              resource: { uri: "test://embedded-resource", mimeType: "text/plain", text: "This is an embedded resource content." },
            },
          ],
        };
      case "test_multiple_content_types":
        return {
          content: [
            { type: "text", text: "Multiple content types test:" },
            { type: "image", data: PNG, mimeType: "image/png" },
            {
              type: "resource",
              resource: {
                uri: "test://mixed-content-resource",
                mimeType: "application/json",
                text: JSON.stringify({ test: "data", value: 123 }),
              },
            },
          ],
        };
      case "test_tool_with_logging":
        await log(extra, "info", "Tool execution started");
        await sleep(50);
        await log(extra, "info", "Tool processing data");
        await sleep(50);
        await log(extra, "info", "Tool execution completed");
        return text("Tool with logging executed successfully");
      case "test_error_handling":
        return { isError: true, content: [{ type: "text", text: "This tool intentionally returns an error for testing" }] };
      case "test_tool_with_progress": {
        const progressToken = request.params._meta?.progressToken;
        for (const progress of [0, 50, 100]) {
          if (progressToken !== undefined) {
            await extra.sendNotification({ method: "notifications/progress", params: { progressToken, progress, total: 100 } });
          }
          if (progress < 100) await sleep(50);
        }
        return text("Tool with progress executed successfully");
      }
      case "test_sampling": {
        const result = await ask(
          "sampling",
          "sampling/createMessage",
          { messages: [{ role: "user", content: { type: "text", text: String(args.prompt) } }], maxTokens: 100 },
          types.CreateMessageResultSchema,
        );
        const answer = result.content?.type === "text" ? result.content.text : JSON.stringify(result.content);
        return text(`LLM response: ${answer}`);
      }
      case "test_elicitation": {
        const schema = {
          type: "object",
          properties: {
            username: { type: "string", description: "User's response" },
            email: { type: "string", description: "User's email address" },
          },
          required: ["username", "email"],
        };
        const result = await ask("elicitation", "elicitation/create", { message: String(args.message), requestedSchema: schema }, types.ElicitResultSchema);
        return text(`User response: action=${result.action}, content=${JSON.stringify(result.content ?? {})}`);
      }
      case "test_elicitation_sep1034_defaults":
        return await elicit("Please review and update the form fields with defaults", SEP1034_SCHEMA);
      case "test_elicitation_sep1330_enums":
        return await elicit("Please select options from the enum fields", SEP1330_SCHEMA);
      default:
        throw new types.McpError(types.ErrorCode.InvalidParams, `unknown tool ${request.params.name}`);
    }
  });

  server.setRequestHandler(types.ListResourcesRequestSchema, async () => ({
    resources: Object.entries(RESOURCES).map(([uri, r]) => ({ uri, name: r.name, description: `The ${r.name} resource`, mimeType: r.mimeType })),
  }));
  server.setRequestHandler(types.ListResourceTemplatesRequestSchema, async () => ({
    resourceTemplates: [
      { uriTemplate: "test://template/{id}/data", name: "template", description: "Data for an id", mimeType: "application/json" },
    ],
  }));
  server.setRequestHandler(types.ReadResourceRequestSchema, async (request) => {
    const uri = request.params.uri;
    const resource = RESOURCES[uri];
    if (resource !== undefined) {
      const { name: _, ...content } = resource;
      return { contents: [{ uri, ...content }] };
    }
    const match = TEMPLATE.exec(uri);
    if (match !== null) {
      const id = match[1];
      return {
        contents: [{ uri, mimeType: "application/json", text: JSON.stringify({ id, templateTest: true, data: `Data for ID: ${id}` }) }],
      };
    }
    throw new types.McpError(types.ErrorCode.InvalidParams, `unknown resource ${uri}`);
  });
  server.setRequestHandler(types.SubscribeRequestSchema, async (request) => {
    subscriptions.add(request.params.uri);
    return {};
  });
  server.setRequestHandler(types.UnsubscribeRequestSchema, async (request) => {
    subscriptions.delete(request.params.uri);
    return {};
  });

  server.setRequestHandler(types.ListPromptsRequestSchema, async () => ({ prompts: PROMPTS }));
  server.setRequestHandler(types.GetPromptRequestSchema, async (request) => {
    const args = request.params.arguments ?? {};
    const user = (content) => ({ role: "user", content });
    switch (request.params.name) {
      case "test_simple_prompt":
        return { messages: [user({ type: "text", text: "This is a simple prompt for testing." })] };
      case "test_prompt_with_arguments":
        return { messages: [user({ type: "text", text: `Prompt with arguments: arg1='${args.arg1}', arg2='${args.arg2}'` })] };
      case "test_prompt_with_embedded_resource":
        return {
          messages: [
            user({ type: "resource", resource: { uri: args.resourceUri, mimeType: "text/plain", text: "Embedded resource content for testing." } }),
            user({ type: "text", text: "Please process the embedded resource above." }),
          ],
        };
      case "test_prompt_with_image":
        return {
          messages: [user({ type: "image", data: PNG, mimeType: "image/png" }), user({ type: "text", text: "Please analyze the image above." })],
        };
      default:
        throw new types.McpError(types.ErrorCode.InvalidParams, `unknown prompt ${request.params.name}`);
    }
  });
  return server;
}

// Sessions by id: each has its own Server and transport.
const transports = new Map();
const LOOPBACK = new Set(["127.0.0.1", "localhost", "[::1]"]);

function refuse(res, status, message) {
  res.writeHead(status, { "Content-Type": "application/json" });
  res.end(JSON.stringify({ jsonrpc: "2.0", id: null, error: { code: -32000, message } }));
}

function hostname(value) {
  try {
    return new URL(value.includes("://") ? value : `http://${value}`).hostname;
  } catch {
    return null;
  }
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

const httpServer = http.createServer(async (req, res) => {
  try {
    if (new URL(req.url, "http://127.0.0.1").pathname !== "/mcp") return refuse(res, 404, "not found");
    // DNS rebinding: only loopback names, in Host and (when sent) Origin.
    const origin = req.headers.origin;
    if (!LOOPBACK.has(hostname(req.headers.host ?? "")) || (origin !== undefined && !LOOPBACK.has(hostname(origin)))) {
      return refuse(res, 403, "Host or Origin is not a loopback name");
    }
    const sessionId = req.headers["mcp-session-id"];
    const body = req.method === "POST" ? await readJson(req) : undefined;
    let transport = sessionId !== undefined ? transports.get(sessionId) : undefined;
    if (transport === undefined) {
      if (sessionId !== undefined) return refuse(res, 404, "Session not found");
      if (req.method !== "POST" || !types.isInitializeRequest(body)) return refuse(res, 400, "No session: initialize first");
      transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: randomUUID,
        onsessioninitialized: (id) => transports.set(id, transport),
      });
      transport.onclose = () => {
        if (transport.sessionId !== undefined) transports.delete(transport.sessionId);
      };
      await newServer().connect(transport);
    }
    await transport.handleRequest(req, res, body);
  } catch (error) {
    if (!res.headersSent) refuse(res, 500, String(error));
  }
});
httpServer.listen(0, "127.0.0.1", () => {
  console.log(`listening on http://127.0.0.1:${httpServer.address().port}/mcp`);
});
