# How XTuner training is launched: one process, or torchrun over --gpus N processes per node (several nodes
# through torchrun's NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT), optionally under DeepSpeed, and which
# floating-point precision the GPUs get. Imported by training/stages.py; not run on its own.
"""Training launch: the command line `xtuner train` would build, and the GPU's precision."""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from training.presets import RunConfigError

DEEPSPEED_CONFIGS = {"zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3"}  # XTuner's bundled json names
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: bf16 in hardware (a T4 is 7.5; torch would only emulate it)


def world(gpus: int, env: Mapping[str, str]) -> tuple[int, int]:
    """(nodes, training processes in all) for `--gpus` per node and torchrun's NNODES.

    Args:
        gpus: processes per node.
        env: the environment (NNODES).
    """
    try:
        nodes = int(env.get("NNODES", "1"))
    except ValueError:
        raise RunConfigError(f"NNODES must be a whole number, got {env['NNODES']!r}") from None
    if nodes < 1:
        raise RunConfigError(f"NNODES must be at least 1, got {nodes}")
    return nodes, nodes * gpus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(config: Path, train_dir: Path, gpus: int, deepspeed: str | None, env: Mapping[str, str],
                  resume_from: Path | None = None) -> list[str]:
    """The argv that trains `config`: `python -m xtuner.tools.train` for one process, else torchrun over it
    with launcher `pytorch`, as `NPROC_PER_NODE=N xtuner train` does.

    Args:
        config: the rendered XTuner config.
        train_dir: XTuner's --work-dir.
        gpus: processes per node (--gpus).
        deepspeed: "zero2", "zero3" or None.
        env: the environment: NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT for several nodes.
        resume_from: a checkpoint (file, or a DeepSpeed checkpoint directory) to continue from.
    """
    args = ["-m", "xtuner.tools.train", str(config), "--work-dir", str(train_dir)]
    if deepspeed is not None:
        args += ["--deepspeed", DEEPSPEED_CONFIGS[deepspeed]]
    if resume_from is not None:
        args += ["--resume", str(resume_from)]
    nodes, _ = world(gpus, env)
    if nodes == 1 and gpus == 1:
        return [sys.executable, *args]
    if nodes > 1 and not env.get("MASTER_ADDR"):
        raise RunConfigError("NNODES > 1 needs MASTER_ADDR (node 0's address) and MASTER_PORT on every node")
    port = env.get("MASTER_PORT") or str(_free_port())
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
            f"--node_rank={env.get('NODE_RANK', '0')}", f"--nproc_per_node={gpus}",
            f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}", f"--master_port={port}",
            *args, "--launcher", "pytorch"]


def gpu_precision(gpus: int) -> str | None:
    """"bfloat16" when every GPU used has bf16 in hardware, "float16" otherwise; None without CUDA.

    Args:
        gpus: GPUs per node that training uses (the first `gpus` visible ones).
    """
    import torch

    if not torch.cuda.is_available():
        return None
    used = range(min(gpus, torch.cuda.device_count()))
    supported = all(torch.cuda.get_device_capability(i) >= BF16_MIN_CAPABILITY for i in used)
    return "bfloat16" if supported else "float16"


def node_rank(env: Mapping[str, str]) -> int:
    """This machine's NODE_RANK (0 unless several machines train together).

    Args:
        env: the environment.
    """
    try:
        return int(env.get("NODE_RANK") or 0)
    except ValueError:
        raise RunConfigError(f"NODE_RANK must be a whole number, got {env['NODE_RANK']!r}") from None
