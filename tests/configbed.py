"""Config dicts for the host tests of reloader.config and the modules that read it: one valid app (BASE)
to vary key by key, and the check every rejection must pass (one line, naming the file)."""

from __future__ import annotations

from typing import Any

import pytest

from reloader.config import ConfigError, parse

SRC = "myapp.toml"
BASE = {"name": "myapp", "working_directory": "/srv/myapp", "virtualenv": "/srv/myapp/venv", "wsgi": "app:app"}
DROP = object()  #: in an ``app`` override: remove that key from BASE


def cfg(app: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A valid config dict (BASE) with *app* keys overridden (DROP removes one) and extra sections."""
    merged = {**BASE, **(app or {})}
    return {"app": {k: v for k, v in merged.items() if v is not DROP}, **sections}


def rejected(data: dict[str, Any], source: str = SRC) -> str:
    """The one-line message parse() refuses *data* with, prefixed by the file name."""
    with pytest.raises(ConfigError) as e:
        parse(data, source=source)
    message = str(e.value)
    assert "\n" not in message and "\r" not in message, f"error message is not one line: {message!r}"
    assert message.startswith(f"{source}: "), message
    return message
