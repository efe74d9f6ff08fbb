"""HTTP dialects: how requests in each client's shape become a `GenerationRequest`, and how a
`GenerationResult` or an error goes back in that shape. No BentoML and no routes here: the
routes are in service.py."""
