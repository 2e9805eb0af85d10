"""`lmkit serve`: an OpenAI-compatible HTTP API, a web chat page and (later) audio jobs over one model.

- api.py        the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (SSE), /v1/generate,
                /health, the chat page at /; errors in OpenAI's shape; the API key; body-size limits
- schemas.py    request bodies (pydantic) and the limits they are checked against
- prompts.py    request -> prompt ids, through toolkit.chat.Session (chat templates, dropping old turns)
- scheduler.py  ONE worker thread owns the model and advances every active request by a token per round
- server.py     binds the socket and runs uvicorn

This package is the only one in toolkit that knows HTTP.
"""

from toolkit.serve.api import ServeSettings, create_app  # noqa: F401
