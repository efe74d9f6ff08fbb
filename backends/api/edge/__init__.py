"""The HTTP edge, before and around every route: `middleware` (the ASGI middleware: keys, CORS,
limits, trace and metrics), `guards` (what keeps web pages from driving a local server),
`headers` (the key a request presents, the generation headers), `hangups` (a client that
leaves cancels its work) and `errors` (one status per backend error, one body shape)."""
