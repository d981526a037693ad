"""The OpenAI-compatible HTTP server (`glm45 serve`): chat and text completions with GLM-4.5's thinking and
tool calls, streaming, Prometheus metrics. `create_app(engine, config)` builds the app; `run_server` serves it."""

from glm45.server.app import create_app, run_server
from glm45.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "run_server"]
