"""reloader: zero-downtime, verified ``systemctl reload`` for Gunicorn apps behind nginx.

Data flows one way: :mod:`reloader.config` (typed, validated) → :mod:`reloader.render` (Jinja, pure)
→ :mod:`reloader.bus` (the only module that talks to systemd) → :mod:`reloader.swap` (the reload state
machine) → :mod:`reloader.cli` (thin).
"""

__version__ = "0.1.0"
