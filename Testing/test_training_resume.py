"""Kill and resume: a CPU training run in a real subprocess is killed with SIGKILL in
the middle of an epoch, resumed from its last saved state, and ends with weights (and
loss history) bit-identical to an uninterrupted run with the same seed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from training_helpers import write_folder

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, os, sys, time
import torch
torch.set_num_threads(1)  # the same kernels in every process: CPU results repeat bit for bit
from LesionSegLib.training import train
data, out, mode, marker = sys.argv[1:5]
overrides = {"epochs": 2, "batch_size": 2, "epoch_length": 8, "val_fraction": 0.5, "size": [32, 32],
             "model_config": {"base_width": 4, "depth": 3}, "checkpoint_every_steps": 1,
             "augment": {"hflip": 0.5, "rotate": 10}, "optimizer.lr": 0.01}
def progress(epoch, step, total, metrics):
    # in the second epoch, after step 3 (whose state is saved right after this call) ...
    if mode == "kill" and epoch == 1 and step == 3 and "val_dice" not in metrics:
        open(marker, "w").close()
        time.sleep(300)  # ... wait here to be killed: state of step 2 is on disk
r = train("unet", data, out, recipe_overrides=overrides, resume=(mode == "resume"), progress=progress, seed=7)
print(json.dumps([h["train_loss"] for h in r.history]))
'''


def _child(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    data = write_folder(tmp_path / "data", 4, 40, 1)
    marker = tmp_path / "killme"
    whole = _child(tmp_path, data, tmp_path / "whole", "whole", tmp_path / "unused")
    victim = _child(tmp_path, data, tmp_path / "killed", "kill", marker)
    deadline = time.time() + 240
    while not marker.exists():
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.time() < deadline, "the child never reached the kill point"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "killed" / "training_state.pt", weights_only=True)["training_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)  # killed mid-epoch, after a saved step
    resumed = _child(tmp_path, data, tmp_path / "killed", "resume", tmp_path / "unused")
    out_r, err_r = resumed.communicate(timeout=300)
    out_w, err_w = whole.communicate(timeout=300)
    assert resumed.returncode == 0, err_r[-3000:]
    assert whole.returncode == 0, err_w[-3000:]
    assert json.loads(out_r.splitlines()[-1]) == json.loads(out_w.splitlines()[-1])  # identical loss history
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    sa = torch.load(tmp_path / "whole" / "training_state.pt", weights_only=True)["training_state"]["optimizer"]
    sb = torch.load(tmp_path / "killed" / "training_state.pt", weights_only=True)["training_state"]["optimizer"]
    assert all(torch.equal(sa["state"][i]["exp_avg"], sb["state"][i]["exp_avg"]) for i in sa["state"])
