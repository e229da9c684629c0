"""The optional HTTP front door: an OpenAI-compatible API, the admin REST endpoints and
the web dashboard, served through the same engine (queue, budget, eviction) as gRPC.

Off unless the config has an ``[http]`` table; nothing listens on TCP without it.
"""
