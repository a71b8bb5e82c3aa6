"""The bridge across MCP 2026-07-28: handshake-era ("legacy") clients in front of a 2026-07-28-only
("modern") upstream. ``era`` tells the eras apart, ``wire`` translates messages (pure), ``core`` runs a
bridged session against the upstream, ``http`` writes its answers for the HTTP front."""
