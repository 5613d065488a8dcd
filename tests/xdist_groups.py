"""Which tests share a pytest-xdist worker (`make test`: `-n 2 --dist loadgroup`).

The tests of one group run on one worker, one after another; every other test goes to
whichever worker is free. `group_of` names a test's group, so a new test cannot forget it:

- `timing`: tests marked `@pytest.mark.timing` (they assert on wall time), one at a time;
- `team-stack`: users of tests/stack.py's fixtures, so PostgreSQL, moto and `mlflow
  server` start once;
- a module and the params of the module-scoped fixtures its tests use (`tests/test_service.py:
  server=one-process`): a module's server starts once, each param's on its own worker.

An `xdist_group` mark set in a test module wins. pytest 9.2 no longer lets pytest-xdist 3.8
put the group into the node id (pytest-dev/pytest-xdist#1386: `--dist loadgroup` then spreads
every test as if it had none), so each worker writes the groups it collected to a file the
controller named, and the controller schedules with `GroupScheduling`, which reads them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

TEAM_STACK_GROUP = "team-stack"
TIMING_GROUP = "timing"
# The key, in each worker's `workerinput`, of the file it writes the groups to.
GROUPS_FILE_KEY = "imgcls_xdist_groups"


def group_of(item: pytest.Item) -> str | None:
    """The xdist group of a test (see the module docstring); None: any worker, alone."""
    marks = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in
                    item.iter_markers("xdist_group")})  # fmt: skip
    if marks:
        return "_".join(marks)  # as pytest-xdist joins them
    if item.get_closest_marker("timing"):
        return TIMING_GROUP
    fixtures = [defs[-1] for defs in item._fixtureinfo.name2fixturedefs.values() if defs]
    if any(f.func.__module__ == "tests.stack" for f in fixtures):
        return TEAM_STACK_GROUP
    shared = sorted(f.argname for f in fixtures if f.scope in ("module", "class"))
    if not shared:
        return None
    params = getattr(item, "callspec", None)
    keys = [f"{name}={params.params[name]}" for name in shared if params and name in params.params]
    # pytest-xdist reads a group after the last "@" of a node id unless a "]" follows it.
    return re.sub(r"[@\[\]]", "_", ":".join([item.nodeid.split("::")[0], *keys]))


def write_groups(path: Path, items: list[pytest.Item]) -> None:
    """The group of every grouped test, by node id, in `path` (replaced at once: every
    worker writes the same file, and the controller reads it after they all collected)."""
    groups = {item.nodeid: group for item in items if (group := group_of(item))}
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(groups, indent=0))
    partial.replace(path)


class GroupScheduling(LoadScopeScheduling):
    """pytest-xdist's `loadgroup` scheduling, with the groups the workers wrote to
    `groups_file`: a group's tests go to one worker, the biggest groups first."""

    def __init__(self, config: pytest.Config, log, groups_file: Path) -> None:
        super().__init__(config, log)
        self.groups_file = groups_file
        self.groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if nodeid.rfind("@") > nodeid.rfind("]"):  # a pytest-xdist that marks node ids again
            return nodeid.split("@")[-1]
        if self.groups is None:  # read once, when the first collection is scheduled
            self.groups = json.loads(self.groups_file.read_text())
        return self.groups.get(nodeid, nodeid)
