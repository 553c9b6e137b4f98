"""Multi-process training on this CPU: 2 processes on gloo, started by the real launchers.

* 2 processes give the parameters (and logged metrics) of 1 process with the same global batch
  and seed, for BT and VPL reward training, MLE pre-training, PPO and RLOO. Tolerance: 1e-4
  absolute on every parameter (observed: ~5e-6, float summation order; the runs move the
  parameters by ~1e-2). Sequence Tutor's Q/Ψ/G run too, but keep one replay buffer per rank,
  so they are not expected to match one process step for step.
* every rank holds the same parameters after every optimizer step (checksums, exact);
* a DeepSpeed ZeRO-2 run's saved model loads in one process and gives the job's outputs;
* a rank killed with SIGKILL ends the job with an error, without a hang.

The launched worker is ``tests/dist_scripts/train.py``; the toy tasks are in ``toy.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_scripts import toy
from apps.cli import COMMANDS, DELEGATED
from apps.launch import build_command, launch_main
from rlhf.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist_scripts" / "train.py"
EQUAL = ("bt", "vpl", "pretrain", "ppo", "rloo", "pretrain-s2s", "ppo-s2s", "rloo-s2s")  # 2 processes = 1 process
RUN_ONLY = ("q", "psi", "g")
TOL = 1e-4
TOL_S2S = 1e-3
FINAL = {"bt": "reward-bt", "vpl": "reward-vpl", "pretrain": "prior", "ppo": "ppo", "rloo": "rloo", "q": "q", "psi": "psi", "g": "g"}
STAGE = {"bt": "reward-bt", "vpl": "reward-vpl", "pretrain": "prior", **{a: f"tune-{a}" for a in ("ppo", "rloo", "q", "psi", "g")}}
STEPS = {"bt": 4, "vpl": 3, "pretrain": 3, "ppo": 12, "rloo": 3, "q": 6, "psi": 6, "g": 6}  # optimizer steps of each toy run
for _d in (FINAL, STAGE, STEPS):  # the encoder–decoder runs (toy.PARTS): as their decoder-only twins
    _d.update({f"{p}-s2s": _d[p] for p in ("pretrain", "ppo", "rloo")})
LAUNCH_TIMEOUT = 300  # a hang fails the test instead of the suite


def free_port() -> str:
    """A free TCP port for the rendezvous (other jobs on this machine may hold 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_process():
    """2 cores: each launched process gets one thread (inherited through the environment)."""
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONWARNINGS")}
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> Path:
    return toy.save_priors(tmp_path_factory.mktemp("prior") / "prior")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, prior) -> Path:
    """The references: every EQUAL toy run in this (single) process."""
    out = tmp_path_factory.mktemp("one")
    for part in EQUAL:
        toy.run_part(part, out, prior)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, prior) -> tuple[Path, dict]:
    """All toy runs in one 2-process DDP job, started by `rlhf launch` (→ accelerate launch)."""
    out = tmp_path_factory.mktemp("two")
    code = launch_main(["--nproc", "2", "--master-port", free_port(), str(SCRIPT), str(out), str(prior), *EQUAL, *RUN_ONLY], timeout=LAUNCH_TIMEOUT)
    assert code == 0, f"launched job failed with exit status {code}"
    return out, json.loads((out / "checksums.json").read_text())


def max_diff(a: Path, b: Path) -> float:
    """Largest parameter difference, attention key biases left out: their exact gradient is 0
    (softmax ignores a constant added to every score), so Adam turns the float noise of two
    summation orders into ±lr steps there."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa if not k.endswith("k_proj.bias"))


@pytest.mark.parametrize("part", EQUAL)
def test_two_processes_train_like_one(one_process, two_processes, prior, part):
    two, _ = two_processes
    a, b = one_process / part / "models" / FINAL[part], two / part / "models" / FINAL[part]
    # the encoder–decoder's first Adam steps are sign-like on weights with near-zero gradients
    # (its √d-scaled embeddings make logits larger): float noise of the summation order shows
    # there at up to a few 1e-4, so its tolerance is looser; the ranks still agree exactly
    assert max_diff(a, b) < (TOL_S2S if part.endswith("-s2s") else TOL), part
    if part in ("ppo", "rloo", "ppo-s2s", "rloo-s2s"):  # and the runs did move: the tolerance is small against the update
        assert max_diff(a, prior.parent / "prior-s2s" if part.endswith("-s2s") else prior) > 20 * TOL
    # metrics are the global batch's (adaptive β included), written once by rank 0
    ra, rb = read_metrics(one_process / part / "metrics.jsonl"), read_metrics(two / part / "metrics.jsonl")
    assert [r["step"] for r in rb] == list(range(1, len(ra) + 1)) == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        for k, v in x.items():
            if k not in ("time", "stage") and isinstance(v, float):
                assert y[k] == pytest.approx(v, rel=1e-3, abs=1e-5), (part, k)


def test_ranks_hold_identical_parameters_after_every_step(two_processes):
    out, result = two_processes
    assert result["info"]["world_size"] == 2 and result["info"]["distributed_type"] == "DistributedType.MULTI_CPU"
    for part in EQUAL + RUN_ONLY:
        per_step = result["records"][f"{part}:{STAGE[part]}"]
        assert len(per_step) == STEPS[part], part
        for ranks in per_step:
            assert ranks[0] == ranks[1], (part, ranks)  # exact: DDP averages, then identical updates
    for part in RUN_ONLY:  # Sequence Tutor's learners ran and saved a model
        assert (out / part / "models" / part / "model.safetensors").is_file()


@pytest.mark.skipif(sys.platform != "linux", reason="DeepSpeed's CPU accelerator is checked on Linux only")
def test_zero2_checkpoint_loads_in_one_process(one_process, prior, tmp_path, monkeypatch, capfd):
    if importlib.util.find_spec("deepspeed") is None:  # not imported here: it would stay loaded for the rest of the session
        pytest.skip("DeepSpeed is not installed")
    from reward_models.reward_source import load_reward_model
    from reward_models.bradley_terry import rewards

    monkeypatch.chdir(REPO)  # the accelerate config names configs/deepspeed/zero2.json relative to the repository
    code = launch_main(["--nproc", "2", "--master-port", free_port(), "--config-file", "configs/accelerate/deepspeed_zero2.yaml", str(SCRIPT), str(tmp_path), str(prior),
                        "bt", "--probe"], timeout=LAUNCH_TIMEOUT)
    out = capfd.readouterr()
    if code != 0 and ("Unable to JIT load" in out.err or "ninja" in out.err.lower()):
        pytest.skip("DeepSpeed could not build its CPU communication op here (no C++ toolchain / ninja)")
    assert code == 0, out.err[-3000:]
    result = json.loads((tmp_path / "checksums.json").read_text())
    assert result["info"]["distributed_type"] == "DistributedType.DEEPSPEED"
    assert all(r[0] == r[1] for r in result["records"]["bt:reward-bt"])
    final = tmp_path / "bt" / "models" / "reward-bt"
    model = load_reward_model(final).eval()  # a plain HF folder, one process
    ids, mask = toy.probe_batch(toy.word_tokenizer())
    with torch.no_grad():
        assert torch.allclose(rewards(model, ids, mask), torch.tensor(result["info"]["probe_live"]), atol=1e-6)
    assert max_diff(final, one_process / "bt" / "models" / "reward-bt") < TOL  # ZeRO-2 trains like one process
    zero = tmp_path / "bt" / "checkpoints" / "reward-bt" / "step-000004" / "zero"
    assert len(list(zero.glob("*optim_states.pt"))) == 2  # DeepSpeed's own state: one optimizer shard per rank


def test_a_killed_rank_ends_the_job(prior, tmp_path):
    """Rank 1 dies by SIGKILL mid-training while rank 0 waits in an all-reduce: torchrun's
    agent (under accelerate launch) must tear rank 0 down and fail, well within the timeout."""
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
           str(SCRIPT), str(tmp_path), str(prior), "bt", "--steps", "100000", "--die-rank", "1", "--die-after", "3"]
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert "killing myself" in r.stderr and "SIGKILL" in r.stderr and "ChildFailedError" in r.stderr, r.stderr[-3000:]
    assert elapsed < 120
    pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 2
    for pid in pids:  # no rank left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_launch_builds_the_launcher_commands(tmp_path):
    cmd, _ = build_command(["--nproc", "2", "pretrain", "configs/melody.yaml", "pretrain.steps=10", "--quick"])
    assert cmd.argv[1:] == ["launch", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2",
                            "--num_machines", "1", "-m", "apps.cli", "pretrain", "configs/melody.yaml", "pretrain.steps=10", "--quick"]
    cmd, _ = build_command(["--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "6000",
                            "--config-file", str(REPO / "configs/accelerate/deepspeed_zero3.yaml"), "tune", "c.yaml"])
    assert cmd.argv[1:] == ["launch", "--config_file", str(REPO / "configs/accelerate/deepspeed_zero3.yaml"), "--num_processes", "8",
                            "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "6000",
                            "-m", "apps.cli", "tune", "c.yaml"]
    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=4\nnode2 slots=4\n")
    cmd, _ = build_command(["--launcher", "deepspeed", "--nproc", "4", "--nnodes", "2", "--hostfile", str(hosts), "--master-addr", "node1",
                            "--config-file", str(REPO / "configs/deepspeed/zero3.json"), "run", "c.yaml"])
    assert cmd.argv[1:] == ["--hostfile", str(hosts), "--num_nodes", "2", "--num_gpus", "4", "--master_addr", "node1", "--no_local_rank",
                            "--module", "apps.cli", "run", "c.yaml"]
    assert cmd.env == {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "configs/deepspeed/zero3.json")}
    assert "ACCELERATE_USE_DEEPSPEED=true" in cmd.shell()
    # every shipped config is a file the launchers can read
    for f in list((REPO / "configs/accelerate").glob("*.yaml")) + list((REPO / "configs/deepspeed").glob("*.json")):
        assert f.stat().st_size > 0
    for bad in (["--nproc", "2"], ["--nproc", "2", "nonsense"], ["--nproc", "2", "--nnodes", "2", "pretrain", "c.yaml"],
                ["--nproc", "2", "--launcher", "deepspeed", "--config-file", str(REPO / "configs/accelerate/ddp.yaml"), "run", "c.yaml"]):
        assert launch_main(bad, commands=[*COMMANDS, *DELEGATED]) == 2, bad
    assert launch_main(["--nproc", "2", "--dry-run", "pretrain", "configs/melody.yaml"]) == 0
