"""Multi-process sampling: two gloo processes under torchrun write the same arrays as one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from arpg import generate, save_checkpoint
from arpg.cli import main
from arpg.distributed import batch_seed, sample_distributed
from arpg.vq import VQConfig, VQModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_batches_use_their_own_seeds(make_model):
    model = make_model()
    labels = [0, 1, 2, 3, 4]
    got = sample_distributed(model, labels, 3, batch_size=2, seed=9, cfg_scale=2.0)
    want = torch.cat([generate(model, torch.tensor(labels[i : i + 2]), 3, seed=batch_seed(9, i // 2), cfg_scale=2.0)
                      for i in range(0, 5, 2)])
    assert np.array_equal(got, want.view(5, 4, 4).numpy())


def test_two_gloo_processes_match_one(make_model, tmp_path):
    save_checkpoint(make_model(), str(tmp_path / "tiny.pt"))
    torch.manual_seed(0)
    torch.save({"model": VQModel(VQConfig.tiny()).state_dict()}, tmp_path / "vq.pt")
    # 7 images in batches of 2: 4 batches, so the 2 ranks take 2 rounds and rank 1 sits out the last.
    args = ["sample", "--ckpt", tmp_path / "tiny.pt", "--vq", tmp_path / "vq.pt", "--vq-config", "VQ-tiny",
            "--classes", "1,4,6,9", "--num-images", 7, "--batch", 2, "--steps", 3, "--cfg", 2.0, "--top-k", 20,
            "--seed", 3, "--device", "cpu", "--no-progress"]
    args = [str(a) for a in args]
    assert main([*args, "--npz", str(tmp_path / "one.npz")]) == 0

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "arpg.cli", *args, "--npz", str(tmp_path / "two.npz")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (7, 64, 64, 3) and one["arr_0"].dtype == np.uint8
    assert list(one["labels"]) == [1, 1, 4, 4, 6, 6, 9]
    assert np.array_equal(one["labels"], two["labels"])
    assert np.array_equal(one["arr_0"], two["arr_0"])


@pytest.mark.gpu
def test_distributed_init_single_process_on_cuda():
    from arpg.distributed import init_distributed

    assert init_distributed("cuda")[:2] == (0, 1)
