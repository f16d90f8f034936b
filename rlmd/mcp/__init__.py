"""``rlm mcp``: an MCP server on stdio that is a thin client of the daemon's socket."""
