"""The wire level: framing (``framing``), JSON-RPC dispatch (``jsonrpc``), error kinds (``errors``)."""
