"""The Alembic history is one line: a single head, every revision reachable from it.

No test names a revision id: a migration added on another branch only has to revise the
current head (two migrations revising the same parent make two heads, and fail here with
both names, before ``alembic upgrade head`` refuses them)."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from rev_tasks.testing.harness import ROOT


def test_one_head_and_no_orphan_revision() -> None:
    script = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
    heads = script.get_heads()
    assert len(heads) == 1, f"several Alembic heads (re-point one down_revision): {heads}"
    line = [rev.revision for rev in script.walk_revisions("base", heads[0])]
    every = {rev.revision for rev in script.walk_revisions()}
    assert set(line) == every and len(line) == len(every)
    assert script.get_revision(line[-1]).down_revision is None  # the chain reaches base
