"""``retclip serve``: an HTTP API and a web page over :class:`~retclip.Segmenter`."""

from __future__ import annotations

from retclip.server.app import ServerConfig, ServerError, create_app

__all__ = ["ServerConfig", "ServerError", "create_app"]
