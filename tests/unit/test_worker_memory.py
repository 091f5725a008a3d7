"""gc.freeze() before the pool forks: the children keep sharing the parent's objects.

Measured for real: a parent holding ~40 MB of Python objects forks, the child runs a full
garbage collection, and the parent reads how many of its pages became private again (the
ones the child copied). Linux only (/proc/self/smaps_rollup).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rev_tasks.testing.harness import ROOT, python_json
from rev_tasks.testing.variants import build_tiny_llama

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc/self/smaps_rollup"
)

SCRIPT = textwrap.dedent(
    """
    import gc, os, sys
    from rev_tasks.ops.memory import freeze_preloaded

    def private_dirty_mb():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024

    keep = [{"i": i, "s": [i, str(i)]} for i in range(250_000)]  # preloaded modules' stand-in
    frozen = freeze_preloaded()
    to_parent, to_child = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        gc.collect()  # what a pool child's collector does sooner or later
        os.write(to_parent[1], b"x")
        os.read(to_child[0], 1)
        os._exit(0)
    os.read(to_parent[0], 1)
    copied = private_dirty_mb()  # the parent's pages the child no longer shares
    os.write(to_child[1], b"x")
    os.waitpid(pid, 0)
    print(frozen, round(copied, 1), gc.get_freeze_count())
    """
)


def _run(tuning: str) -> tuple[bool, float, int]:
    env = {**os.environ, "REV_WORKER_MEMORY_TUNING": tuning, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    frozen, copied, count = out.stdout.split()
    return frozen == "True", float(copied), int(count)


def test_frozen_objects_stay_shared_after_fork() -> None:
    frozen, copied_frozen, count = _run("1")
    assert frozen and count > 250_000
    off, copied_plain, count_off = _run("0")
    assert not off and count_off == 0
    # unfrozen, the child's collection copies the pages of every object it visits
    assert copied_plain > 20, copied_plain
    assert copied_frozen < copied_plain / 3, (copied_frozen, copied_plain)


LEAN = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    from rev_tasks.ops.memory import lean_imports
    from rev_tasks.testing.variants import minilm_path

    with lean_imports() as on:
        import transformers.modeling_utils
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from rev_tasks.inference import load_model, site_signatures
    heavy = ("torch._dynamo", "sympy", "torch.distributed.tensor")
    after_import = [m for m in heavy if m in sys.modules]
    from rev_tasks.core.challenges import generate_challenges
    from rev_tasks.core.keys import DEMO_KEY

    prompts = [c.prompt for c in generate_challenges(DEMO_KEY, 6)]  # different lengths: padded
    digests = {}
    for name, path in (("llama", sys.argv[1]), ("minilm", minilm_path())):
        model = load_model(str(path))
        sigs = site_signatures(model.pooled_states(prompts, model.sites), DEMO_KEY, 512)
        h = hashlib.sha256()
        for per in sigs:
            for site in sorted(per):
                h.update(per[site].tobytes())
        digests[name] = h.hexdigest()
    after_run = [m for m in heavy if m in sys.modules]

    import torch._dynamo
    from torch._dynamo import trace_rules
    from transformers.modeling_utils import PreTrainedModel

    replayed = id(PreTrainedModel.can_record_outputs.fget) in trace_rules._allowed_callable_ids
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3)).tolist()
    print(json.dumps({"on": on, "after_import": after_import, "after_run": after_run,
                      "digests": digests, "real": not hasattr(torch._dynamo, "_rev_deferred"),
                      "replayed": replayed, "compiled": compiled}))
    """
)


def _lean(tuning: str, llama: Path) -> dict:
    return python_json(LEAN, str(llama), env={**os.environ, "REV_WORKER_MEMORY_TUNING": tuning})


def test_lean_imports_defer_dynamo_and_keep_signatures(tmp_path: Path) -> None:
    """The worker's preload without torch._dynamo, sympy and DTensor: padded batches of a
    Llama (transformers' vmap masks) and MiniLM sign bit for bit as with the full import,
    nothing heavy is imported by running them, and dynamo still works when asked for."""
    # built here: save_pretrained (accelerate's unwrap_model) imports dynamo itself
    llama = build_tiny_llama(tmp_path / "llama")
    lean = _lean("1", llama)
    full = _lean("0", llama)
    assert lean["on"] and not full["on"]
    assert lean["after_import"] == [] and lean["after_run"] == [], lean
    assert "torch._dynamo" in full["after_import"]  # what the deferral saves
    assert lean["digests"] == full["digests"]
    for doc in (lean, full):
        assert doc["real"] and doc["replayed"] and doc["compiled"] == [3.0, 3.0, 3.0]
