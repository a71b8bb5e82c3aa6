"""``mcp-heal-proxy login NAME --device``: the OAuth device authorization grant (RFC 8628).

For machines without a browser, or whose loopback callback the browser cannot reach (a remote shell):
the proxy asks the authorization server for a device code, prints where to go and the code to enter
there (from any device), and polls the token endpoint until the user approved, within the server's
``interval`` (slowing down when told to), bounded by the code's lifetime and the login's wait.
Discovery, scopes, registration rules and the stored grant are the browser login's (endpoints.py,
rules.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TextIO

import aiohttp

from mcp_heal_proxy.auth.bodies import BodyTooLarge, response_body
from mcp_heal_proxy.auth.endpoints import (
    RegisteredClient,
    base_grant,
    client_auth,
    discover,
    failure_reason,
    grant_from,
    http_client,
    register,
    token_request,
)
from mcp_heal_proxy.auth.errors import LoginError, TokenRefused
from mcp_heal_proxy.auth.login import say
from mcp_heal_proxy.auth.rules import token_auth_method
from mcp_heal_proxy.auth.tokens import Grant, TokenFile
from mcp_heal_proxy.config import UpstreamConfig
from mcp_heal_proxy.display import mask_url
from mcp_heal_proxy.upstream.tls import tls_context

DEVICE_CODE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
DEVICE_ENDPOINT: Final = "device_authorization_endpoint"
# RFC 8628 section 3.2: without an interval, poll every 5 s; section 3.5: slow_down adds 5 s.
DEFAULT_INTERVAL: Final = 5.0
SLOW_DOWN_STEP: Final = 5.0
# A server saying 0 (or less) does not get a busy loop.
MIN_INTERVAL: Final = 1.0
REGISTRATION_GRANT_TYPES: Final = (DEVICE_CODE_GRANT, "refresh_token")


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """The device authorization answer (RFC 8628 section 3.2). ``device_code`` is a secret."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float

    def __repr__(self) -> str:
        return f"DeviceAuthorization(verification_uri={self.verification_uri!r}, expires_in={self.expires_in})"


def parse_device_authorization(payload: object) -> DeviceAuthorization:
    """The answer's fields, checked; LoginError when it is not a device authorization answer."""
    if not isinstance(payload, Mapping):
        raise LoginError("the device authorization answer is not a JSON object")
    device_code, user_code = payload.get("device_code"), payload.get("user_code")
    uri = payload.get("verification_uri", payload.get("verification_url"))  # the latter: Google's name
    if not isinstance(device_code, str) or not isinstance(user_code, str) or not isinstance(uri, str):
        raise LoginError("the device authorization answer lacks device_code, user_code or verification_uri")
    complete = payload.get("verification_uri_complete")
    expires_in = payload.get("expires_in")
    interval = payload.get("interval")
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete if isinstance(complete, str) else None,
        expires_in=float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 1800.0,
        interval=max(float(interval), MIN_INTERVAL) if isinstance(interval, int | float) else DEFAULT_INTERVAL,
    )


async def poll(
    request_token: Callable[[], Awaitable[dict[str, Any]]],
    authorization: DeviceAuthorization,
    *,
    wait: float,
    again: str,
) -> dict[str, Any]:
    """Ask for the token every ``interval`` seconds until the user approved (RFC 8628 section 3.4-3.5):
    ``authorization_pending`` goes on, ``slow_down`` goes on more slowly, every other answer ends the
    login. Bounded by the code's lifetime and ``wait``."""
    interval = authorization.interval
    bound = min(authorization.expires_in, wait)
    try:
        async with asyncio.timeout(bound):
            while True:
                await asyncio.sleep(interval)
                try:
                    return await request_token()
                except TokenRefused as exc:
                    if exc.error == "authorization_pending":
                        continue
                    if exc.error == "slow_down":
                        interval += SLOW_DOWN_STEP
                        continue
                    if exc.error == "expired_token":
                        raise LoginError(
                            f"the code expired before the login was approved; start again: {again}"
                        ) from None
                    if exc.error == "access_denied":
                        raise LoginError("the login was refused at the authorization server (access_denied)") from None
                    raise LoginError(f"the token endpoint refused the device login: {exc.error}") from None
    except TimeoutError:
        raise LoginError(f"the login was not approved within {bound:.0f} s; start again: {again}") from None


async def _authorize_device(
    http: aiohttp.ClientSession, endpoint: str, form: dict[str, str], client: RegisteredClient, method: str
) -> DeviceAuthorization:
    headers = {"Accept": "application/json", **client_auth(form, client.client_id, client.secret, method)}
    try:
        async with http.post(endpoint, data=form, headers=headers, allow_redirects=False) as response:
            status = response.status
            try:
                payload = json.loads(await response_body(response))
            except (ValueError, BodyTooLarge):
                payload = None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise LoginError(f"cannot reach the device authorization endpoint: {failure_reason(exc, endpoint)}") from None
    if status != 200:
        error = payload.get("error") if isinstance(payload, dict) else None
        # Only the OAuth error code: a description could echo what was sent.
        raise LoginError(f"the authorization server refused the device login: {error or f'HTTP {status}'}")
    return parse_device_authorization(payload)


async def device_login(
    upstream: UpstreamConfig, token_file: TokenFile, previous: Grant | None, *, out: TextIO, wait: float, again: str
) -> Grant:
    """The device login of one upstream; stores the grant (the caller holds the login lock). ``again``
    is the browser login's command (login_command)."""
    async with http_client(tls_context(upstream), proxy=upstream.proxy) as http:
        found = await discover(http, upstream.url, lambda line: say(out, line))
        metadata = found.metadata
        endpoint = metadata.get(DEVICE_ENDPOINT)
        token_endpoint = metadata.get("token_endpoint")
        if not isinstance(endpoint, str):
            raise LoginError(
                "the authorization server offers no device login (no device_authorization_endpoint in its "
                f"metadata): run `{again} --no-browser`, open the URL it prints, and paste the address the "
                "browser ends on"
            )
        if not isinstance(token_endpoint, str):
            raise LoginError("the authorization server metadata lacks token_endpoint")
        scopes = found.scopes(upstream, previous)
        if upstream.client_id:
            client = RegisteredClient(upstream.client_id, upstream.client_secret, None)
        else:
            client = await register(http, metadata, scopes, redirect_uri=None, grant_types=REGISTRATION_GRANT_TYPES)
        supported = metadata.get("token_endpoint_auth_methods_supported")
        method = token_auth_method(
            client.registered_method, supported if isinstance(supported, list) else None, client.secret is not None
        )
        # The token is for the upstream: resource names it (RFC 8707), as in the browser login.
        resource = found.resource or upstream.url
        form = {"resource": resource}
        if scopes:
            form["scope"] = " ".join(scopes)
        authorization = await _authorize_device(http, endpoint, form, client, method)
        say(out, f"Log in to {upstream.name} ({mask_url(upstream.url)}) from any device with a browser:")
        say(out, f"open {authorization.verification_uri} and enter the code {authorization.user_code}")
        if authorization.verification_uri_complete:
            say(out, "or open this URL, which carries the code:")
            say(out, authorization.verification_uri_complete)
        say(out, f"Waiting for the login to be approved (up to {min(authorization.expires_in, wait):.0f} s) ...")

        async def request_token() -> dict[str, Any]:
            grant_form = {"grant_type": DEVICE_CODE_GRANT, "device_code": authorization.device_code}
            grant_form["resource"] = resource
            try:
                return await token_request(http, token_endpoint, grant_form, client.client_id, client.secret, method)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise LoginError(
                    f"cannot reach the token endpoint {mask_url(token_endpoint)}: {failure_reason(exc, token_endpoint)}"
                ) from None

        answer = await poll(request_token, authorization, wait=wait, again=f"{again} --device")
    grant = grant_from(answer, base_grant(upstream, found, token_endpoint, client, method, resource, scopes))
    async with token_file.lock():
        token_file.save(grant)
    return grant
