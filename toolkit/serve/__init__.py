"""`lmkit serve`: an OpenAI-compatible HTTP API and a web chat page over one model, or T5 audio rollout jobs.

- api.py        the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (SSE), /v1/generate,
                /health, the chat page at /; errors in OpenAI's shape; the API key; body-size limits
- schemas.py    request bodies (pydantic) and the limits they are checked against
- prompts.py    request -> prompt ids, through toolkit.chat.Session (chat templates, dropping old turns)
- scheduler.py  ONE worker thread owns the model and advances every active request by a token per round
- audio.py      a T5 audio run: rollout jobs on disk, run one at a time by a worker thread
- client.py     the client of those jobs (urllib only), for `lmkit audio rollout --server`
- server.py     binds the socket and runs uvicorn

This package is the only one in toolkit that knows HTTP.
"""

from toolkit.serve.api import ServeSettings, create_app, create_audio_app  # noqa: F401
from toolkit.serve.audio import AudioSettings, is_audio_run  # noqa: F401
