"""``retclip serve``: an HTTP API and a web page over :class:`~retclip.Segmenter`."""

from __future__ import annotations

from retclip.errors import require_extra

#: What the server needs beyond the core install (``pip install 'retclip[serve]'``).
SERVER_MODULES = ("fastapi", "uvicorn", "python_multipart")
require_extra("serve", "retclip serve", SERVER_MODULES)

from retclip.server.app import ServerConfig, ServerError, create_app  # noqa: E402

__all__ = ["ServerConfig", "ServerError", "create_app"]
