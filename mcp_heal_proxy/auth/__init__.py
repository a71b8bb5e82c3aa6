"""OAuth in front of upstream MCP servers that need a login (issue 15)."""
