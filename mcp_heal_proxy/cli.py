"""Command line: ``mcp-heal-proxy serve|stdio|check-config|demo|sessions|tail``. The only module that exits
the process. Each command imports what it needs when it runs: ``stdio`` is launched per client session,
so its start-up must not pay for the HTTP server, the status page or the store backends."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import os
import shlex
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

import structlog

from mcp_heal_proxy import __version__
from mcp_heal_proxy.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ENV_PREFIX,
    LOG_FORMATS,
    LOG_LEVELS,
    MEMORY_STATE,
    ConfigError,
    ProxyConfig,
    build_config,
    default_state_path,
    describe,
    unknown_variables,
)
from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.errors import ProxyError
from mcp_heal_proxy.observability import configure_logging
from mcp_heal_proxy.upstream.routes import proxy_for

if TYPE_CHECKING:
    from aiohttp import web

# Defaults shown in --help, kept here so that the help does not import the watch module.
DEFAULT_PROXY_URL = "http://127.0.0.1:8787"
DEFAULT_GIVE_UP = 60.0

EXIT_USAGE = 2

SERVE_EXAMPLES = """\
examples:
  mcp-heal-proxy serve --upstream https://mcp.example.com/mcp
  mcp-heal-proxy serve --upstream http://127.0.0.1:8000/mcp --port 9000 --state :memory:
  mcp-heal-proxy serve --config proxy.toml          # several upstreams, headers, timeouts
  mcp-heal-proxy serve --config proxy.toml --set max_sessions=500 --set allowed_origins=https://app.example.com
  MCP_HEAL_PROXY_UPSTREAM=https://mcp.example.com/mcp mcp-heal-proxy serve

settings come from the config file, then MCP_HEAL_PROXY_* variables (UPSTREAM, CONFIG, and every
[server] key in upper case: HOST, PORT, STATE, TOKEN, MAX_SESSIONS, ...), then flags; later ones win.
--set KEY=VALUE sets any [server] key, or an upstream key (read_timeout, client, ...) of --upstream.

then point the client at the proxy, e.g. in ~/.codex/config.toml:
  [mcp_servers.example]
  url = "http://127.0.0.1:8787/mcp"
"""

STDIO_EXAMPLES = """\
examples:
  mcp-heal-proxy stdio --upstream https://mcp.example.com/mcp
  mcp-heal-proxy stdio --upstream https://mcp.example.com/mcp --header "Authorization: Bearer ${MY_TOKEN}"
  mcp-heal-proxy stdio --config proxy.toml --name github
  mcp-heal-proxy stdio --upstream https://mcp.internal/mcp --set ca_file=/etc/corp-ca.pem   # a private CA

as a command in a client's config, with the command's full path (GUI clients start commands with a
minimal PATH, where a bare mcp-heal-proxy is not found; `command -v mcp-heal-proxy` prints the path),
e.g. in Claude Desktop's claude_desktop_config.json:
  {"mcpServers": {"example": {"command": "/home/you/mcp-heal-proxy/.venv/bin/mcp-heal-proxy",
                              "args": ["stdio", "--upstream", "https://mcp.example.com/mcp"]}}}
"""

TOP_EXAMPLES = """\
examples:
  mcp-heal-proxy demo                                         # watch a heal, about 3 seconds
  mcp-heal-proxy serve --upstream https://mcp.example.com/mcp # one upstream at /mcp
  mcp-heal-proxy serve --config proxy.toml                    # several upstreams, each at /NAME/mcp
  mcp-heal-proxy check-config proxy.toml                      # validate, print the effective config

run "mcp-heal-proxy COMMAND --help" for each command's options and examples.
"""

DEMO_EXAMPLES = """\
examples:
  mcp-heal-proxy demo             # about 3 seconds: a call, 2.5 s idle, a healed call
  mcp-heal-proxy demo --verbose   # also show the proxy's own log events (session.healed)

Everything runs in this process on free 127.0.0.1 ports; no server of your own is needed.
Exit status 0 when the proxy healed the expired session, 1 when it did not.
"""


CHECK_EXAMPLES = """\
examples:
  mcp-heal-proxy check-config proxy.toml
  GITHUB_TOKEN=... mcp-heal-proxy check-config config.example.toml
  mcp-heal-proxy check-config proxy.toml --port 9000 --set max_sessions=500   # as serve would see it
  mcp-heal-proxy check-config --upstream https://mcp.example.com/mcp         # no file
  mcp-heal-proxy check-config --connect proxy.toml                           # and try each upstream

The same checks as serve, with MCP_HEAL_PROXY_* variables and the flags applied: what check-config
accepts, serve can run. Exit status 0 when the config is valid, 2 with a one-line reason when it is not.
With --connect, each upstream is tried once instead of the config being printed (DNS, TCP, TLS, HTTP,
an MCP initialize whose session is then ended), one line each: what worked, and where it stopped with
the fix. Exit status 0 when every upstream answered, 1 when one did not.
"""


SESSIONS_EXAMPLES = """\
examples:
  mcp-heal-proxy sessions                          # the default store, while the proxy runs or not
  mcp-heal-proxy sessions --config proxy.toml --json
  mcp-heal-proxy sessions --state redis://127.0.0.1:6379/0
  mcp-heal-proxy sessions forget 3f9c2a1b          # via the running proxy: upstream DELETE too

forget asks the running proxy to end the session (DELETE upstream, then the record); when no proxy
answers, it deletes the record only and says so: the upstream session is then left to expire on its own. MCP_HEAL_PROXY_TOKEN is sent when the proxy has a token.
"""

TAIL_EXAMPLES = """\
examples:
  mcp-heal-proxy tail                              # the local proxy, http://127.0.0.1:8787
  mcp-heal-proxy tail http://127.0.0.1:9000 --json | jq .

MCP_HEAL_PROXY_TOKEN is sent as the bearer token when set. A proxy not reached yet ("cannot reach") or
lost while followed ("lost", e.g. a restart) is tried again with backoff; tail exits with status 1 once
it stayed unreachable for --give-up seconds.
"""


LOGIN_EXAMPLES = """\
examples:
  mcp-heal-proxy login github --config proxy.toml                 # opens a browser
  mcp-heal-proxy login github --config proxy.toml --no-browser    # prints the URL to open
  mcp-heal-proxy login github --config proxy.toml --device        # a code to enter on any device

--no-browser on a remote machine: open the printed URL in any browser, log in, and paste the address
the browser ends on (a page that does not load) back here. --device needs an authorization server
that offers the device authorization grant (RFC 8628).

for an upstream with auth = "oauth" in the config file:
  [upstreams.github]
  url = "https://api.githubcopilot.com/mcp/"
  auth = "oauth"

exit status 0 once the tokens are stored, 1 when the login failed, 2 for a config mistake.
"""


class UsageError(Exception):
    """A user mistake: reported in one line, exit status 2, no traceback."""


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the config, shared by serve and check-config. Values are checked by
    config.build_config, with the same rules as the file's (so --port 70000 and port = 70000 get one answer)."""
    parser.add_argument("--upstream", metavar="URL", help="upstream MCP endpoint, served at /mcp")
    parser.add_argument("--host", help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", help=f"port to listen on, 0 for any free one (default {DEFAULT_PORT})")
    parser.add_argument(
        "--state",
        metavar="PATH",
        help="session store: a SQLite file, :memory:, or redis://HOST:PORT/DB (default: a file in the user's state directory)",
    )
    parser.add_argument(
        "--log-format",
        metavar="{" + ",".join(LOG_FORMATS) + "}",
        help="log format (default auto: console on a terminal)",
    )
    parser.add_argument("--log-level", metavar="{" + ",".join(LOG_LEVELS) + "}", help="log level (default info)")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any key of config.example.toml's [server] table (lists comma-separated), or an upstream key "
        "for --upstream's upstream; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with examples in each subcommand's help."""
    parser = argparse.ArgumentParser(
        prog="mcp-heal-proxy",
        description="Local proxy that keeps MCP Streamable HTTP sessions alive when the server forgets them.",
        epilog=TOP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mcp-heal-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the proxy in front of one or more upstream MCP servers",
        description="Run the proxy: --upstream URL is served at http://HOST:PORT/mcp, each [upstreams.NAME] "
        "of a config file at its path (default /NAME/mcp).",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file (see config.example.toml)")
    _add_config_flags(serve)
    check = commands.add_parser(
        "check-config",
        help="validate a config (file, environment, flags) and print it, secrets masked",
        description="Validate a config file, with MCP_HEAL_PROXY_* variables and any serve flags applied, and "
        "print the effective config with secrets masked.",
        epilog=CHECK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("file", metavar="FILE", nargs="?", help="TOML config file (default: $MCP_HEAL_PROXY_CONFIG)")
    check.add_argument(
        "--connect",
        action="store_true",
        help="try each upstream once (DNS, TCP, TLS, HTTP, MCP initialize) and print where it stopped",
    )
    _add_config_flags(check)
    demo = commands.add_parser(
        "demo",
        help="watch the proxy heal an expired session (built-in server and client)",
        description="Start a built-in MCP server whose sessions expire after 2 s idle, the proxy in front of it, "
        "and a scripted client that calls a tool, waits past the expiry, and calls again.",
        epilog=DEMO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--verbose", action="store_true", help="print the proxy's log events to stderr")
    sessions = commands.add_parser(
        "sessions",
        help="list the sessions in the store (works while a proxy runs), or end one",
        description="List the client sessions in the session store, or end one with 'sessions forget ID'.",
        epilog=SESSIONS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sessions.add_argument(
        "action", nargs="?", choices=("list", "forget"), default="list", help="list (default) or forget"
    )
    sessions.add_argument("id", nargs="?", metavar="ID", help="forget: the session id, or its first characters")
    where = sessions.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE", help="read the store and proxy address of this config file")
    where.add_argument("--state", metavar="PATH", help="the store: a SQLite file or redis://HOST:PORT/DB")
    sessions.add_argument("--json", action="store_true", help="print JSON (full ids)")
    sessions.add_argument(
        "--proxy", metavar="URL", help=f"forget: the running proxy (default from --config, else {DEFAULT_PROXY_URL})"
    )
    stdio = commands.add_parser(
        "stdio",
        help="bridge a client that launches MCP servers as commands (stdin/stdout) to an upstream, healing",
        description="Speak MCP's stdio transport to the client that launched this command, and Streamable HTTP "
        "to the upstream, healing its sessions as serve does. No port, state file or config needed; stdout "
        "carries JSON-RPC only, logs go to stderr. Ends the upstream session and exits 0 when stdin closes.",
        epilog=STDIO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stdio.add_argument("--upstream", metavar="URL", help="the remote MCP endpoint")
    stdio.add_argument("--config", metavar="FILE", help="take the upstream from this config file (with --name)")
    stdio.add_argument("--name", metavar="NAME", help="the [upstreams.NAME] of --config to use")
    stdio.add_argument(
        "--header",
        action="append",
        default=[],
        metavar='"NAME: VALUE"',
        help="a header for every upstream request (repeatable; ${VAR} is read from the environment)",
    )
    stdio.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an upstream key of config.example.toml (ca_file, client_cert, read_timeout, ...); repeatable",
    )
    stdio.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="stderr log level (warning)")
    stdio.add_argument("--log-format", choices=LOG_FORMATS, default="json", help="stderr log format (json)")
    tail_parser = commands.add_parser(
        "tail",
        help="follow a running proxy's requests and heals, one line each",
        description="Follow a running proxy's live events (requests and heals), one line each.",
        epilog=TAIL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tail_parser.add_argument("url", nargs="?", metavar="URL", help=f"the proxy (default {DEFAULT_PROXY_URL})")
    tail_parser.add_argument("--json", action="store_true", help="one JSON object per line, for piping")
    tail_parser.add_argument(
        "--give-up", type=float, default=DEFAULT_GIVE_UP, metavar="SECONDS", help="exit after this long unreachable"
    )
    login = commands.add_parser(
        "login",
        help='log in to an upstream with auth = "oauth"; serve then sends its tokens',
        description="Log in to the upstream's authorization server (OAuth code flow with PKCE) and store "
        "the tokens beside the session store; serve refreshes them and sends them upstream.",
        epilog=LOGIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    logout = commands.add_parser("logout", help="forget the tokens of an upstream's login")
    for command in (login, logout):
        command.add_argument("name", metavar="NAME", help="the upstream's name ([upstreams.NAME])")
        command.add_argument("--config", metavar="FILE", help="TOML config file")
        command.add_argument("--state", metavar="PATH", help="the session store, as given to serve")
    login.add_argument("--no-browser", action="store_true", help="print the URL to open instead of opening it")
    login.add_argument(
        "--device", action="store_true", help="log in with a code entered on any device (RFC 8628), no redirect"
    )
    return parser


def _stdio(args: argparse.Namespace) -> int:
    """The stdio bridge: errors in its options are one line on stderr (stdout is the client's)."""
    from mcp_heal_proxy.config import bridge_server_options
    from mcp_heal_proxy.front.stdio import serve_stdio, stdio_upstream

    try:
        # otel and otel_propagate: the [server] keys the bridge takes too.
        settings, server = bridge_server_options(args.settings, os.environ, args.config)
        upstream, max_line, state = stdio_upstream(
            url=args.upstream,
            config_file=args.config,
            name=args.name,
            header_flags=args.header,
            environ=os.environ,
            settings=settings,
        )
    except ConfigError as exc:
        print(f"mcp-heal-proxy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args.log_format, args.log_level, tuple(v for v in upstream.headers.values() if v))
    otel = None
    if server.get("otel"):
        from mcp_heal_proxy.otel import from_environment

        otel = from_environment(transport="pipe", propagate_proxy=server.get("otel_propagate") == "proxy")
    try:
        return _run(serve_stdio(upstream, max_line_bytes=max_line, state=state, otel=otel))
    except KeyboardInterrupt:
        return 0


def command_line(argv: Sequence[str]) -> str:
    """The command as the user ran it, to repeat in a hint: quoted for a shell, URLs masked."""
    return shlex.join(["mcp-heal-proxy", *(mask_url(word) for word in argv)])


def _sessions(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from mcp_heal_proxy.watch import forget_session, list_sessions

    config: ProxyConfig | None = None
    config_file = args.config or os.environ.get(ENV_PREFIX + "CONFIG")
    if args.state:
        state = args.state
    elif config_file:
        config = build_config(config_file=config_file, flags={})
        state = config.state
    else:
        state = os.environ.get(ENV_PREFIX + "STATE") or default_state_path()
    if state != MEMORY_STATE and "://" not in state:
        state = os.path.expanduser(state)
    token = os.environ.get(ENV_PREFIX + "TOKEN") or (config.token if config else None)
    try:
        if args.action == "forget":
            if not args.id:
                raise UsageError("sessions forget needs a session ID")
            return forget_session(
                state,
                args.id,
                config=config,
                proxy_url=args.proxy,
                token=token,
                out=sys.stdout,
                again=command_line(argv),
            )
        if args.id:
            # ``sessions list ID``: the same command with forget in place of list.
            words = list(argv)
            where = words.index(args.id)
            before = [word for word in words[:where] if word != "list"]
            meant = command_line([*before, "forget", *words[where:]])
            raise UsageError(f"unexpected argument {args.id!r} (did you mean `{meant}`?)")
        return list_sessions(state, as_json=args.json, out=sys.stdout)
    except ProxyError as exc:
        raise UsageError(exc.message) from None


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it exists (not on Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def banner(config: ProxyConfig, port: int) -> list[str]:
    """What serve prints once it listens: where, and for each upstream the URL a client should paste."""
    bound = f"[{config.host}]:{port}" if ":" in config.host else f"{config.host}:{port}"
    if config.listens_on_all_interfaces:
        # The URLs below are the loopback ones (0.0.0.0 is no address to connect to); from another
        # machine the client needs this machine's address instead.
        bound += " (all interfaces)"
    lines = [f"mcp-heal-proxy {__version__} on {bound}, sessions in {config.state_display}"]
    for upstream in config.upstreams:
        url = config.client_url(upstream, port)
        route = proxy_for(upstream.url, upstream.proxy)
        via = f" via proxy {route.shown} ({route.source})" if route is not None else ""
        lines.append(f"  {upstream.name}: {url} -> {mask_url(upstream.url)}{via}")
        lines.append(f'  paste into your MCP client: url = "{url}"')
    return lines


# A request in flight holds a few dozen objects the cyclic garbage collector tracks (its coroutines,
# futures, dicts); with 32 requests in flight the default first-generation threshold (700) ran a
# collection every few dozen requests, each finding nothing to free (the request path makes no
# reference cycles): about 5% of the proxy's CPU under load, see docs/benchmarks.md.
GC_THRESHOLD: Final = 10_000


def tune_garbage_collection() -> None:
    """Once the proxy is up: what is alive now (modules, the config, the app, the sessions loaded from
    the store) lives as long as the process, so collections stop scanning it (gc.freeze); young objects
    are collected after GC_THRESHOLD net allocations instead of 700."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, middle, old)


async def serve(config: ProxyConfig) -> int:
    """Serve until SIGINT or SIGTERM; return the exit status."""
    from aiohttp import web

    from mcp_heal_proxy.front.app import FAST_PATH_KEY, build_app
    from mcp_heal_proxy.front.http1 import FastSite

    log = structlog.get_logger("mcp_heal_proxy")
    # shutdown_timeout: after SIGTERM the listener closes at once (new requests are refused) and open
    # streams get shutdown_grace to finish before their handlers are cancelled. aiohttp waits for a
    # running handler twice, each time up to shutdown_timeout (before and after it cancels the request's
    # body, which a proxy handler no longer reads): half each keeps the whole stop within the grace.
    app = build_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=config.shutdown_grace / 2)
    try:
        await runner.setup()
    except ProxyError as exc:
        # The store could not be opened (an unwritable path, Redis not answering): the user's to fix.
        raise UsageError(f"cannot open the session store {config.state_display}: {exc.message}") from None
    # The proxy's own HTTP/1.1 server takes the connections: it answers POSTs to the MCP endpoints and
    # hands everything else to aiohttp (front/http1.py). With http_server = "aiohttp", aiohttp takes them all.
    site: web.BaseSite = (
        FastSite(runner, config.host, config.port, app[FAST_PATH_KEY])
        if config.http_server == "fast"
        else web.TCPSite(runner, config.host, config.port)
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
    tune_garbage_collection()
    # Handlers go in before the banner: a supervisor may signal as soon as it reads the URL.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # With --port 0 the system picked a free port: report the real one.
    port = runner.addresses[0][1] if runner.addresses else config.port
    for line in banner(config, port):
        print(line, flush=True)
    for upstream in config.upstreams:
        url = config.client_url(upstream, port)
        log.info(
            "proxy.started",
            upstream=upstream.name,
            url=url,
            upstream_url=mask_url(upstream.url),
            proxy=route.shown if (route := proxy_for(upstream.url, upstream.proxy)) is not None else None,
            state=config.state_display,
        )
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.token:
        log.warning(
            "proxy.exposed_without_token",
            host=config.host,
            hint="anyone who can reach this address can use the upstreams; set [server] token",
        )
    try:
        await stop.wait()
    except BaseException:
        await runner.cleanup()
        raise
    await _stop(runner, app, stop, config.shutdown_grace)
    return 0


async def _stop(runner: web.AppRunner, app: web.Application, stop: asyncio.Event, grace: float) -> None:
    """Stop serving: calls in flight get ``grace`` seconds, and the user is told so; a second Ctrl-C (or
    SIGTERM) ends them at once, as uvicorn and docker do."""
    from mcp_heal_proxy.front.app import PROXIES_KEY
    from mcp_heal_proxy.tasks import TaskOwner

    log = structlog.get_logger("mcp_heal_proxy")
    proxies = list(app[PROXIES_KEY].values()) if PROXIES_KEY in app else []
    calls = sum(proxy.calls_in_flight for proxy in proxies)
    log.info("proxy.stopping", calls_in_flight=calls, grace_s=grace)
    if calls:
        noun = "call" if calls == 1 else "calls"
        print(
            f"mcp-heal-proxy: stopping: waiting up to {grace:g} s for {calls} {noun} in flight; "
            "Ctrl-C again to stop now",
            file=sys.stderr,
            flush=True,
        )
    stop.clear()
    owner = TaskOwner()
    cleanup = owner.spawn(runner.cleanup(), name="cleanup")
    again = owner.spawn(stop.wait(), name="second-signal")
    try:
        await asyncio.wait((cleanup, again), return_when=asyncio.FIRST_COMPLETED)
        if not cleanup.done():
            ended = sum(proxy.calls_in_flight for proxy in proxies)
            log.info("proxy.stopping_now", calls_ended=ended)
            print(
                f"mcp-heal-proxy: stopping now (ending {ended} {'call' if ended == 1 else 'calls'})",
                file=sys.stderr,
                flush=True,
            )
            for proxy in proxies:
                proxy.end_calls()
        await asyncio.shield(cleanup)
    finally:
        again.cancel()
        await asyncio.gather(again, return_exceptions=True)


async def _login_pasting(config: ProxyConfig, name: str) -> int:
    """``login --no-browser``: the redirect's address may also be pasted on stdin."""
    from mcp_heal_proxy.auth.login import run_login
    from mcp_heal_proxy.auth.paste import stdin_lines

    async with stdin_lines() as pasted:
        return await run_login(config, name, out=sys.stdout, open_browser=False, pasted=pasted)


def _login_or_logout(args: argparse.Namespace) -> int:
    from mcp_heal_proxy.auth.errors import LoginError
    from mcp_heal_proxy.auth.login import run_login, run_logout

    config = build_config(config_file=args.config, flags={"state": args.state})
    configure_logging(config.log_format, "warning", config.secrets())
    try:
        if args.command == "logout":
            return _run(run_logout(config, args.name, out=sys.stdout))
        if args.device:
            return _run(run_login(config, args.name, out=sys.stdout, open_browser=False, device=True))
        if args.no_browser:
            return _run(_login_pasting(config, args.name))
        return _run(run_login(config, args.name, out=sys.stdout, open_browser=True))
    except LoginError as exc:
        print(f"mcp-heal-proxy: login failed: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``mcp-heal-proxy`` console script."""
    given = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(given)
    if args.command == "demo":
        from mcp_heal_proxy.demo import run_demo

        configure_logging("auto", "info" if args.verbose else "warning")
        sys.exit(_run(run_demo(sys.stdout)))
    if args.command == "stdio":
        sys.exit(_stdio(args))
    from mcp_heal_proxy.watch import WatchError, tail

    if args.command == "tail":
        try:
            token = os.environ.get(ENV_PREFIX + "TOKEN")
            sys.exit(
                asyncio.run(
                    tail(
                        args.url,
                        as_json=args.json,
                        token=token,
                        out=sys.stdout,
                        give_up=args.give_up,
                        again=command_line(given),
                    )
                )
            )
        except WatchError as exc:
            print(f"mcp-heal-proxy: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
    try:
        if args.command == "sessions":
            sys.exit(_sessions(args, given))
        if args.command in ("login", "logout"):
            sys.exit(_login_or_logout(args))
        flags = {
            "upstream": args.upstream,
            "host": args.host,
            "port": args.port,
            "state": args.state,
            "log_format": args.log_format,
            "log_level": args.log_level,
        }
        config_file = args.file if args.command == "check-config" else args.config
        config = build_config(config_file=config_file, flags=flags, settings=args.settings)
        unknown = unknown_variables(os.environ, config_file)
        if args.command == "check-config":
            for name, meant in unknown:
                hint = f" (did you mean {meant}?)" if meant else ""
                print(f"mcp-heal-proxy: warning: {name} is not a setting{hint}; it is ignored", file=sys.stderr)
            if args.connect:
                from mcp_heal_proxy.connect_check import check_connections

                # The lines say what failed; the upstream client's own warnings would repeat it.
                configure_logging(config.log_format, "error", config.secrets())
                sys.exit(_run(check_connections(config, sys.stdout)))
            print(json.dumps(describe(config), indent=2, default=list))
            sys.exit(0)
        configure_logging(config.log_format, config.log_level, config.secrets())
        for name, meant in unknown:
            structlog.get_logger("mcp_heal_proxy").warning(
                "config.unknown_variable", variable=name, did_you_mean=meant, hint="it is ignored"
            )
        sys.exit(_run(serve(config)))
    except (UsageError, ConfigError) as exc:
        print(f"mcp-heal-proxy: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except WatchError as exc:
        print(f"mcp-heal-proxy: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
