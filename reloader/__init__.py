"""reloader: zero-downtime, verified ``systemctl reload`` for Gunicorn apps behind nginx.

Data flows one way: :mod:`reloader.config` (typed, validated) → :mod:`reloader.render` (Jinja, pure) →
:mod:`reloader.install` (writes the files, starts the units through :mod:`reloader.bus`, the only module that
talks to systemd) → the reload engines systemd runs as the units' hooks, on their shared layer
:mod:`reloader.engine`: :mod:`reloader.swap` (one master: "generation", "hup") and :mod:`reloader.fleet`
(instances: "blue-green", "rolling"), run by the units' hooks in :mod:`reloader.systemd_hooks` →
:mod:`reloader.commands` and :mod:`reloader.cli` (thin: the operator's commands ask systemd for the reload and
report what it did). docs/architecture.md lists every module.
"""

__version__ = "0.1.0"
