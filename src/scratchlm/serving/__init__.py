"""Serving: the continuous-batching ``engine`` and the OpenAI-compatible server over it.

Importing this package imports nothing heavy; the server module needs ``fastapi`` and ``uvicorn``.
(The terminal chat is a command, ``cli/chat.py``: it talks to an ``LM`` directly, not to the engine.)
"""
