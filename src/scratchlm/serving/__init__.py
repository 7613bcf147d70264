"""Serving: the continuous-batching ``engine``, the OpenAI-compatible ``openai_server``, the terminal ``chat``.

Importing this package imports nothing heavy; the server module needs ``fastapi`` and ``uvicorn``.
"""
