"""`personabot serve`: personas over an OpenAI-compatible HTTP API (and the web console)."""
