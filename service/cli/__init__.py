"""The command line and operations (`unroll ...`, `unroll up`): the top layer, on top of the
HTTP client, the store and the workers."""
