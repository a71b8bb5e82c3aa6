"""OAuth in front of upstreams that need a login.

- ``metadata``: pure functions: the URL the client dialed, protected-resource and authorization-server
  metadata rewritten for it, ``WWW-Authenticate`` challenges, the ``resource`` mapping.
- ``discovery``: fetching and briefly caching an upstream's metadata (bounded timeouts and sizes).
- ``standin``: the pass-through's HTTP side: metadata routes, the stand-in authorization server
  (``/authorize``, ``/token``, ``/register``, ``/revoke`` forwarded with ``resource`` mapped) and the
  hook that points upstream challenges at the proxy's metadata.
- ``managed``: the proxy's own login (``auth = "oauth"``): discovery, authorization code + PKCE, refresh,
  and the hook that puts the token on every upstream request; ``tokens``: where tokens are kept.
"""
