"""The web console: personas and their versions, a playground, and operations, as server-rendered pages.

`pages.mount(app, context)` adds it under `/console/` to the `personabot serve` application.
"""
