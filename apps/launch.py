"""``rlhf launch``: build the real ``accelerate launch`` or ``deepspeed`` command for an ``rlhf``
subcommand, print it, run it. Nothing more: the launchers start, watch and tear down the
processes; ``rlhf.trainer`` / ``rlhf.distributed`` do the rest inside each process::

    rlhf launch --nproc 2 pretrain configs/melody.yaml
      → accelerate launch --multi_gpu --num_processes 2 --num_machines 1 ... -m apps.cli pretrain configs/melody.yaml
    rlhf launch --nproc 2 --config-file configs/accelerate/deepspeed_zero2.yaml train-reward configs/reward-music.yaml
    rlhf launch --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 tune configs/counterpoint.yaml
    rlhf launch --launcher deepspeed --nproc 4 --hostfile hosts --nnodes 2 --config-file configs/deepspeed/zero3.json run configs/counterpoint.yaml

In place of a subcommand a Python script can be given (``... train.py args``); it is launched
the same way. ``--dry-run`` only prints the command. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEEPSPEED_CONFIG = REPO / "configs" / "deepspeed" / "zero2.json"


@dataclass
class Command:
    """A launcher command line and the environment variables it needs on top of ours."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one would type it in a shell (environment assignments first)."""
        return shlex.join([f"{k}={v}" for k, v in self.env.items()] + self.argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf launch",
        description="Run an rlhf subcommand on several processes / machines through `accelerate launch` (default) or the `deepspeed` "
        "launcher. Builds the launcher command, prints it, runs it, and returns its exit status.",
    )
    p.add_argument("--nproc", type=int, required=True, help="processes per machine (GPUs per machine; CPU: processes, each with OMP_NUM_THREADS cores)")
    p.add_argument("--nnodes", type=int, default=1, help="machines (default 1)")
    p.add_argument("--node-rank", type=int, default=None, help="this machine's rank, 0 .. nnodes-1 (run the same command on every machine)")
    p.add_argument("--master-addr", default=None, help="address of the rank-0 machine (required with --nnodes > 1)")
    p.add_argument("--master-port", type=int, default=None, help="port on the rank-0 machine (launcher default: 29500)")
    p.add_argument("--launcher", choices=["accelerate", "deepspeed"], default="accelerate", help="accelerate (default) or deepspeed")
    p.add_argument("--config-file", default=None,
                   help="accelerate: an accelerate config (configs/accelerate/*.yaml; default plain DDP); deepspeed: a DeepSpeed JSON "
                   "(configs/deepspeed/*.json; default zero2.json)")
    p.add_argument("--hostfile", default=None, help="deepspeed launcher: hostfile of the machines ('host slots=N' per line)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="<subcommand> ...",
                   help="an rlhf subcommand with its arguments (e.g. pretrain configs/melody.yaml), or a script.py with its arguments")
    return p


def _target(command: list[str]) -> list[str]:
    """What each process runs: ``-m apps.cli <subcommand> ...`` or ``<script.py> ...``."""
    if command[0].endswith(".py"):
        return command
    return ["-m", "apps.cli", *command]


def _exe(name: str) -> str:
    """The launcher of this Python's environment (the venv's bin), else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def accelerate_command(args: argparse.Namespace) -> Command:
    """``accelerate launch``: flags on the command line override the config file's values;
    --num_processes is the total over all machines."""
    total = args.nproc * args.nnodes
    argv = [_exe("accelerate"), "launch"]
    if args.config_file:
        argv += ["--config_file", args.config_file]
    elif total > 1:
        # torchrun under accelerate; on a CPU-only host each process runs on gloo
        argv += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    argv += ["--num_processes", str(total), "--num_machines", str(args.nnodes)]
    if args.nnodes > 1 or args.node_rank is not None:
        argv += ["--machine_rank", str(args.node_rank or 0)]
    if args.master_addr:
        argv += ["--main_process_ip", args.master_addr]
    if args.master_port:
        argv += ["--main_process_port", str(args.master_port)]
    target = _target(args.command)
    if target[0] == "-m":
        argv += ["-m", *target[1:]]  # accelerate launch -m <module> (its --module flag)
    else:
        argv += target
    return Command(argv)


def deepspeed_command(args: argparse.Namespace) -> Command:
    """The ``deepspeed`` launcher. accelerate inside each process reads the DeepSpeed config
    from ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` (as when ``accelerate launch`` starts DeepSpeed);
    ``--no_local_rank`` keeps ``--local_rank=N`` out of the subcommand's arguments."""
    config = Path(args.config_file) if args.config_file else DEFAULT_DEEPSPEED_CONFIG
    argv = [_exe("deepspeed")]
    if args.hostfile:
        argv += ["--hostfile", args.hostfile]
    if args.nnodes > 1:
        argv += ["--num_nodes", str(args.nnodes)]
    argv += ["--num_gpus", str(args.nproc)]
    if args.master_addr:
        argv += ["--master_addr", args.master_addr]
    if args.master_port:
        argv += ["--master_port", str(args.master_port)]
    if args.node_rank is not None and args.nnodes > 1:
        argv += ["--no_ssh", "--node_rank", str(args.node_rank)]  # each machine starts its own processes (no pdsh)
    argv += ["--no_local_rank"]
    target = _target(args.command)
    argv += ["--module", *target[1:]] if target[0] == "-m" else target
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config.resolve())}
    return Command(argv, env)


def check(args: argparse.Namespace, commands: Collection[str] | None = None) -> str | None:
    """The first problem with the arguments, or None; ``commands``: the known subcommand names
    (the command line passes its own; None = any name)."""
    if not args.command:
        return "give an rlhf subcommand to launch, e.g. `rlhf launch --nproc 2 pretrain configs/melody.yaml`"
    if args.command[0] == "launch":
        return "`rlhf launch launch ...`: give the subcommand to run on every process, not launch itself"
    if not args.command[0].endswith(".py") and commands is not None and args.command[0] not in commands:
        return f"unknown subcommand {args.command[0]!r}; use one of {', '.join(commands)} (or a script.py)"
    if args.nproc < 1 or args.nnodes < 1:
        return f"--nproc and --nnodes must be at least 1 (got {args.nproc}, {args.nnodes})"
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        return f"--node-rank must be in 0..{args.nnodes - 1} (got {args.node_rank})"
    if args.nnodes > 1 and args.launcher == "accelerate" and not args.master_addr:
        return "--nnodes > 1 needs --master-addr (the rank-0 machine's address)"
    if args.nnodes > 1 and args.launcher == "deepspeed" and not args.hostfile:
        return "the deepspeed launcher needs --hostfile for --nnodes > 1 (lines 'host slots=N')"
    if args.config_file and not Path(args.config_file).is_file():
        return f"{args.config_file}: config file not found"
    if args.launcher == "deepspeed" and args.config_file and not args.config_file.endswith(".json"):
        return f"--launcher deepspeed takes a DeepSpeed JSON (configs/deepspeed/*.json), not {args.config_file}"
    return None


def build_command(argv: Sequence[str], commands: Collection[str] | None = None) -> tuple[Command, argparse.Namespace]:
    """Parse ``rlhf launch`` arguments into the launcher command (raises SystemExit(2) on bad input)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    problem = check(args, commands)
    if problem:
        parser.error(problem)
    return (deepspeed_command(args) if args.launcher == "deepspeed" else accelerate_command(args)), args


def launch_main(argv: Sequence[str] | None = None, *, timeout: float | None = None, commands: Collection[str] | None = None) -> int:
    """``rlhf launch ...``: print the launcher command, run it, return its exit status.

    ``timeout`` (seconds, for programs and tests) runs the launcher in its own process group
    and kills the whole group when the time is up (exit status 124, as timeout(1))."""
    try:
        cmd, args = build_command(sys.argv[1:] if argv is None else argv, commands)
    except SystemExit as e:
        return int(e.code or 0)
    print(f"launch: {cmd.shell()}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(cmd.shell())
        return 0
    env = {**os.environ, **cmd.env}
    try:
        if timeout is None:
            return subprocess.run(cmd.argv, env=env).returncode
        proc = subprocess.Popen(cmd.argv, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"launch: killed after {timeout:g} s", file=sys.stderr)
            return 124
    except FileNotFoundError:
        print(f"error: {cmd.argv[0]} not found; install {'deepspeed' if args.launcher == 'deepspeed' else 'accelerate'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the launcher got the same SIGINT and stops its processes
        return 130


if __name__ == "__main__":
    sys.exit(launch_main())
