"""torch.distributed plumbing for `torchrun`: process group, DDP/FSDP wrapping, reductions.

Launched by `torchrun`, every process reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment; without them the run is a single process and nothing here does any
communication. Only rank 0 logs, writes metrics and checkpoints.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parscale.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks this process's GPU when there is one, else the CPU.

    A device this machine lacks is refused here, before any data is prepared or any file
    is written, rather than by an assertion deep inside torch at the first `.to()`."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch has no CUDA device (CPU-only build or no GPU); "
                        "use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    return device


def init_distributed(device_name: str) -> DistEnv:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_over_ranks(value: float, env: DistEnv) -> float:
    """The mean of a per-rank scalar over all ranks (the global-batch loss)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / env.world_size


def sum_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sums of per-rank numbers over all ranks, in float64 (held-out NLL and counts)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sum_tensor_over_ranks(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """A tensor's element-wise sum over all ranks (itself in one process), on its own device."""
    if not env.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is true on any (so all ranks stop together on NaN)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def main_first(fn, env: DistEnv):
    """Run `fn` on rank 0 alone, then let the other ranks go on; a failure on rank 0 stops
    every rank (instead of leaving them waiting at a barrier). Returns fn's result on rank 0."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after telling the other ranks
            error = err
    failed = any_rank(error is not None, env)  # a collective: also the barrier
    if error is not None:
        raise error
    if failed:
        from parscale.errors import UserError

        raise UserError("rank 0 stopped with an error (its message is above); fix it and relaunch")
    return result


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks, found by class name so any transformers architecture works."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def wrap_model(model: torch.nn.Module, env: DistEnv, fsdp: bool) -> torch.nn.Module:
    """DDP (gradients all-reduced, mean over ranks) or FSDP2 (parameters sharded per block).

    Returns the module to call forward/backward on; the unwrapped model stays available
    to the caller for saving and evaluation."""
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on CPU: a collective under FSDP, call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The whole optimizer state keyed by parameter name (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state into a (possibly sharded) optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
