"""The optional HTTP API: a face on the resident model that shares the daemon's journal and engine.

`tokens` reads the bearer tokens, `jobs` turns an upload into a journal job and its outputs into an
answer, `app` holds the FastAPI routes, `server` runs uvicorn on a thread of the daemon process.
Only `tokens` is free of FastAPI: `check-config` imports it.
"""
