"""Ansible stdout callback of `vlab fleet run`: one JSON object per line, per host and task.

`vlab fleet run` reads these lines to show progress per host and to turn an unreachable or
failing host into an error row with its reason. Nothing else is printed on stdout, so the
stream stays machine-readable; the controller keeps a copy in the fleet directory.
"""
from __future__ import annotations

import json
import sys
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: vlab_events
type: stdout
short_description: JSON lines of per-host task events for vlab fleet run
description: one JSON object per line on stdout (task start, ok, changed, failed, skipped,
  unreachable, and the final per-host stats).
"""


def _reason(res: dict) -> str:
    """One line saying why a task failed: its message, else its stderr's last line."""
    msg = res.get("msg") or ""
    err = (res.get("stderr") or "").strip().splitlines()
    out = (res.get("stdout") or "").strip().splitlines()
    if err and (not msg or msg.startswith("non-zero return code")):
        msg = err[-1]
    elif out and not msg:
        msg = out[-1]
    return " ".join(str(msg).split())[:500] or "failed"


def _name(task) -> str:
    """The task's own name, without the role's prefix ("vlab : probe" -> "probe")."""
    return getattr(task, "name", None) or task.get_name()


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "vlab_events"

    def _emit(self, **event) -> None:
        event["t"] = round(time.time(), 3)
        sys.stdout.write(json.dumps(event, default=str) + "\n")
        sys.stdout.flush()

    def _result(self, kind: str, result, **extra) -> None:
        res = getattr(result, "_result", {}) or {}
        task = _name(result._task) if getattr(result, "_task", None) else ""
        self._emit(event=kind, host=result._host.get_name(), task=task,
                   changed=bool(res.get("changed")), **extra)

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._emit(event="task", task=_name(task))

    def v2_runner_on_start(self, host, task):
        self._emit(event="start", host=host.get_name(), task=_name(task))

    def v2_runner_on_ok(self, result):
        self._result("ok", result)

    def v2_runner_on_skipped(self, result):
        self._result("skipped", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._result("failed", result, reason=_reason(result._result),
                     ignored=bool(ignore_errors))

    def v2_runner_on_unreachable(self, result):
        self._result("unreachable", result, reason=_reason(result._result))

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed.keys())
        self._emit(event="stats", hosts={h: stats.summarize(h) for h in hosts})

    def v2_playbook_on_no_hosts_matched(self):
        self._emit(event="no_hosts")
