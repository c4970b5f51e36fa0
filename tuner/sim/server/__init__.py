"""HTTP side of the simulated server: SGLang's endpoints over one simulated scheduler.
`state` (requests, the engine driver, shutdown), `generate` (generation endpoints, SSE),
`routes` (the application, info and health endpoints)."""
