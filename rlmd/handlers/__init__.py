"""The JSON-RPC handlers: plain typed functions, one module per method family.

A handler is ``fn(<its dependencies>..., conn, req, params)``: the dependencies (the
store, the job registry, the :class:`~rlmd.app.App`) come first and are bound when the
family's ``routes(app)`` builds its part of the method table; ``conn`` (where
notifications go), ``req`` (id, ordering) and ``params`` (a msgspec Struct) come from the
dispatcher.  So a handler can be imported and called alone.  ``registry.FAMILIES`` lists
the families; see docs/architecture.md for adding one.
"""
