"""An Ansible callback of the test bed's: when each task started and ended, written as JSON lines to
$RELOADER_TIMELINE, so the fleet test and bench/fleet_bench.py can split a playbook's wall time into its
tasks (where Ansible itself spends time, against what the hosts spend in `reloader deploy`)."""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: timeline
type: aggregate
short_description: task start/end times as JSON lines in $RELOADER_TIMELINE
description: used by reloader's fleet test bed only
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "timeline"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._path = os.environ.get("RELOADER_TIMELINE", "")
        self._task: dict | None = None

    def _flush(self) -> None:
        if self._task and self._path:
            self._task["end"] = time.monotonic()
            with open(self._path, "a") as f:
                f.write(json.dumps(self._task) + "\n")
        self._task = None

    def v2_playbook_on_task_start(self, task, is_conditional):  # noqa: ANN001, ANN201
        self._flush()
        self._task = {"task": task.get_name(), "start": time.monotonic()}

    def v2_playbook_on_handler_task_start(self, task):  # noqa: ANN001, ANN201
        self.v2_playbook_on_task_start(task, False)

    def v2_playbook_on_play_start(self, play):  # noqa: ANN001, ANN201
        self._flush()

    def v2_playbook_on_stats(self, stats):  # noqa: ANN001, ANN201
        self._flush()
