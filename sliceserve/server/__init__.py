"""The OpenAI-compatible HTTP server over the runtime engine."""

from sliceserve.server.app import create_app, serve
from sliceserve.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]
