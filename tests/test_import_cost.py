"""Start-up cost: a Falcon-H1 conversion imports neither Llama's config (its transformers validators
pull in the model-loading stack, ~0.7 s) nor ``torch._dynamo`` / sympy (fake tensors, torch's meta
``cat`` and huggingface_hub's DTensor probe import them, ~0.5 s each). Not a timing test: it checks
which modules a fresh interpreter has loaded after real conversions, then that the same check sees
them once a dry run and a Llama config need them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CONFIG = "transformers.models.llama.configuration_llama"
# Loaded only when needed: dry runs (FakeTensorMode), torch_dist (torch.distributed.checkpoint), Llama.
DEFERRED = (LLAMA_CONFIG, "torch._dynamo", "sympy", "torch.distributed.tensor", "torch.distributed.checkpoint")

DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import cli  # noqa: F401  (everything the CLI imports before it runs a command)
    from bridge import api

    src, work, deferred = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])

    def loaded():
        return [m for m in deferred if m in sys.modules]

    report = {"import": loaded()}
    api.hf_to_megatron(src, work / "meg", tp=2)
    api.megatron_to_hf(work / "meg", work / "hf")
    api.reshard(work / "meg", work / "meg1", tp=1)
    report["converted"] = loaded()
    api.hf_to_megatron(src, work / "dry", tp=2, dry_run=True)
    report["dry_run"] = loaded()
    api.family_for_model_type("llama", "test").config_class
    report["llama"] = loaded()
    print(json.dumps(report))
    """
)


def test_falcon_h1_conversions_leave_heavy_modules_unimported(hf_preset, tmp_path):
    src = hf_preset("tiny")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(src), str(tmp_path), json.dumps(DEFERRED)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["import"] == []
    assert report["converted"] == []
    # The check sees these modules once something needs them.
    assert {"torch._dynamo", "sympy"} <= set(report["dry_run"])
    assert LLAMA_CONFIG not in report["dry_run"]
    assert LLAMA_CONFIG in report["llama"]
