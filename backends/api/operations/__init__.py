"""For the people who run the server: `system` (health, listings, device status, unload),
`fleet` (every replica at a glance, and its page), `metrics` (Prometheus), `tracing`
(OpenTelemetry) and `logs` (JSON log lines)."""
