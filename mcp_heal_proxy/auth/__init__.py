"""OAuth in front of upstreams that need a login.

- ``metadata``: pure functions: the URL the client dialed, protected-resource and authorization-server
  metadata rewritten for it, ``WWW-Authenticate`` challenges, the ``resource`` mapping.
- ``discovery``: fetching and briefly caching an upstream's metadata (bounded timeouts and sizes).
- ``standin``: the pass-through's HTTP side: metadata routes, the stand-in authorization server
  (``/authorize``, ``/token``, ``/register``, ``/revoke`` forwarded with ``resource`` mapped) and the
  hook that points upstream challenges at the proxy's metadata.
- the proxy's own login (``auth = "oauth"``), split as the MCP Python SDK splits its client:
  ``login`` (the authorization code flow with PKCE, ``login``/``logout``) and ``device`` (RFC 8628), the
  requests they make (``endpoints``: discovery, registration, token, revocation), the discovery rules
  (``rules``, pure), ``tokens`` (where tokens are kept), ``errors``, ``paste`` (an address pasted on
  stdin); ``managed`` is the hook that puts the token on every upstream request and refreshes it.
- ``bodies``: every OAuth body read whole and bounded.
"""
