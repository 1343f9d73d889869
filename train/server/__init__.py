"""The machinery of python -m train.serve (train/serve.py), one concern per file:

schemas.py       OpenAI's wire format: pydantic request models, reply builders, errors
conversation.py  a request -> the prompt ids and the reply's budget (the chat format)
stops.py         stop strings matched in the text, never half sent
engine.py        the decoding thread: a bounded queue, one continuous batch
chat_model.py    the checkpoint's language model, if it chats (reward and base models: no)
policies.py      continuous batching against batches of agreeing requests (serve_bench)
app.py           the HTTP routes (FastAPI), keys, limits, server-sent events
static/          the chat page: index.html, chat.css, chat.js (package data)
"""
