"""``reloader check``'s look inside the app's virtualenv: can gunicorn load what the config names?

Runs as a *script* under the app's interpreter (like preflight.py: standard library and gunicorn only,
nothing from reloader). Prints one line per problem on stdout and exits 1 if there is any:

* the worker class imports (``gunicorn.util.load_class``; e.g. ``gevent`` needs gunicorn's gevent extra),
* every ``[gunicorn.settings]`` name is a gunicorn setting,
* the ``config_file`` loads and sets nothing reloader owns.
"""

from __future__ import annotations

import json
import runpy
import sys


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # load_class wraps the import's traceback in a RuntimeError: its last line is the real cause.
    cause = [t.strip(" []") for t in text if t.strip(" []")]
    return cause[-1] if cause else type(exc).__name__


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    problems = []
    try:
        from gunicorn.config import KNOWN_SETTINGS
        from gunicorn.util import load_class
    except ImportError as e:
        print(f"gunicorn is not importable in {sys.prefix}: {e}")
        return 1
    try:
        load_class(spec["worker_class"])
    except Exception as e:  # noqa: BLE001 - any failure to load is the answer
        problems.append(f"[gunicorn] worker_class {spec['worker_class']!r} cannot be loaded in {sys.prefix}: "
                        f"{_last_line(e)}")
    known = {s.name for s in KNOWN_SETTINGS}
    for name in spec["settings"]:
        if name not in known:
            problems.append(f"[gunicorn] settings.{name}: not a setting of gunicorn {_version()}")
    if spec["config_file"]:
        try:
            values = runpy.run_path(spec["config_file"])
        except BaseException as e:  # noqa: BLE001
            problems.append(f"[gunicorn] config_file {spec['config_file']}: does not load: "
                            f"{type(e).__name__}: {e}")
        else:
            for name, owner in spec["owned"].items():
                if name in values:
                    problems.append(f"[gunicorn] config_file {spec['config_file']}: sets {name!r}, which reloader "
                                    f"sets from {owner}; remove it from that file")
    for p in problems:
        print(p)
    return 1 if problems else 0


def _version() -> str:
    try:
        import gunicorn

        return gunicorn.__version__
    except (ImportError, AttributeError):
        return "?"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
