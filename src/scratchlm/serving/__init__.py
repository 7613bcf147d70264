"""Serving: the continuous-batching ``engine``, the OpenAI-compatible server, the terminal ``chat``.

Importing this package imports nothing heavy; the server module needs ``fastapi`` and ``uvicorn``.
"""
