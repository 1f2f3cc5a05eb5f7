"""`personabot serve`: the OpenAI-compatible API and the web console, in one aiohttp process."""
