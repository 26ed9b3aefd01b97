"""Scale-out: the trainer under ``torchrun --nproc_per_node 2`` on the CPU (gloo, real
processes): both ranks end with identical weights and only rank 0 writes checkpoints."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_helpers import write_folder

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

SCRIPT = r'''
import json, os, sys
import torch
import LesionSegLib.checkpoint as ck
from LesionSegLib.training import train
data, out = sys.argv[1:3]
rank = int(os.environ["RANK"])
saves = []
real_save = ck.save
def recording_save(path, *args, **kwargs):  # which rank writes which checkpoint
    saves.append(os.path.basename(str(path)))
    return real_save(path, *args, **kwargs)
ck.save = recording_save
overrides = {"epochs": 2, "batch_size": 2, "epoch_length": 8, "val_fraction": 0.5, "size": [32, 32],
             "model_config": {"base_width": 4, "depth": 3}, "checkpoint_every_steps": 0,
             "augment": {"hflip": 0.5, "rotate": 10}}
r = train("unet", data, out, recipe_overrides=overrides, seed=3)
torch.save(r.model.state_dict(), os.path.join(os.path.dirname(out), f"rank{rank}.pt"))
with open(os.path.join(os.path.dirname(out), f"rank{rank}.json"), "w") as f:
    json.dump({"saves": saves, "history": r.history}, f)
'''


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_torchrun_two_cpu_processes(tmp_path):
    data = write_folder(tmp_path / "data", 6, 40, 1)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), str(data),
                           str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # parameters and BN statistics
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["saves"] == [] and r0["saves"].count("last.pt") == 2 and "best.pt" in r0["saves"]
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["best.pt", "last.pt", "training_state.pt"]
    assert not list((tmp_path / "run").glob(".*tmp"))  # no half-written file left by a second writer
    def metrics(history):
        return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]
    assert metrics(r0["history"]) == metrics(r1["history"])  # losses and validation metrics reduced over both ranks
    from LesionSegLib import checkpoint
    prov = checkpoint.load(tmp_path / "run" / "last.pt").provenance
    assert prov["training"]["world_size"] == 2
    weights = checkpoint.load(tmp_path / "run" / "last.pt").model.state_dict()
    assert all(torch.equal(weights[k], w0[k]) for k in w0)
