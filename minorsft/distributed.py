"""Data-parallel training on PyTorch's own engines: torchrun + DDP or FSDP2 (`fully_shard`).

`minorsft train` runs unchanged under `torchrun --nproc-per-node N -m minorsft train ...`:
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, and this module turns them into a process group
(NCCL on GPUs, gloo on the CPU), a device per rank and a wrapped model. Every rank reads the same
seeded sample stream and keeps its own slice of each global batch (rows r, r+W, r+2W, ... for
rank r of W), so the ranks see disjoint samples and the set of samples in a step is exactly the
single-process one. Gradients are sums over the step's samples divided by the global count, so
2 ranks x micro-batch B and 1 rank x micro-batch 2B give the same update.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minorsft.packing import micro_batch_logps

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: str) -> World:
    """Start the process group when launched by torchrun; a single process needs nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank, world_size, local_rank)


def rank_device(world: World, device: str) -> str:
    """Each rank gets its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if world.distributed and device in {"auto", "cuda"} and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return device


# The last barrier's work handle, held for the life of the process. gloo frees a finished work on
# its worker thread, and with it the collectives the barrier waited on; freeing a tensor that
# Python created takes the GIL. The process group's destructor (when DDP's reducer lets go of it
# after training) joins that worker while the main thread holds the GIL, so a worker still
# freeing the barrier then waits forever: one in 12-30 two-process CPU runs hung after training
# (torch 2.13; gdb showed the two threads). Held here, the worker never frees it.
_last_barrier = None


def barrier(world: World) -> None:
    """Wait until every rank is here."""
    global _last_barrier
    if world.distributed and dist.is_initialized():
        work = dist.barrier(async_op=True)
        work.wait()
        _last_barrier = work  # the one before is freed here, by the main thread


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


class AnswerLogpsModule(nn.Module):
    """The policy as a module whose forward returns summed answer log-probs [B] of cache rows.

    DDP and FSDP2 hook the wrapped module's forward (to prepare gradient reduction and to gather
    sharded parameters); the log-prob functions call the decoder and the output head directly,
    so they have to run inside a wrapper's forward rather than around it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, rows: list[dict], pad_id: int, device: torch.device,
                packing: bool = False) -> tuple[torch.Tensor, int]:
        """Summed answer log-probs [B] of cache rows (padded or packed), and tokens run."""
        return micro_batch_logps(self.model, rows, pad_id, device, packing)


def wrap_policy(model: nn.Module, world: World, strategy: str, device: torch.device,
                param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """The module to call in training: plain, DDP-wrapped or FSDP2-sharded."""
    module = AnswerLogpsModule(model)
    if not world.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if param_dtype is not None and param_dtype != torch.float32:
            # Compute in bf16, reduce gradients in fp32, keep fp32 master weights.
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                       reduce_dtype=torch.float32)
        if cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for layer in model.get_decoder().layers:  # one all-gather per decoder layer
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)  # the root: embeddings, final norm, output head
        return module
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def no_gradient_sync(wrapped: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        return _restore_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(wrapped):
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def rank_slice(rows: list, world: World) -> list:
    """This rank's rows of a global batch: r, r+W, r+2W, ..."""
    return rows[world.rank:: world.world_size]


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum over ranks, in place (metrics are sums until divided by the global
    count). Queued on the device: nothing here waits for it."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def full_state_dict(wrapped: nn.Module, world: World, strategy: str) -> dict | None:
    """The policy's full (unsharded) state dict on rank 0, for a single-process checkpoint."""
    inner = wrapped.module if hasattr(wrapped, "module") else wrapped
    model = inner.model
    if world.distributed and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return without_tied_head(model, state) if world.is_main else None
    return model.state_dict() if world.is_main else None


def without_tied_head(model: nn.Module, state: dict) -> dict:
    """`state` without the output head's weight where the model ties it to the input embedding.

    FSDP's full state dict gives the tied pair as two separate CPU copies, and save_pretrained
    writes a tied weight once only when both names share one tensor: the saved model carried a
    second [vocab, hidden] matrix (272 MB at Qwen2-0.5B's shape) that loaders ignore."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return state
    names = {module: name for name, module in model.named_modules()}
    head = names.get(model.get_output_embeddings())
    embedding = names.get(model.get_input_embeddings())
    head_key, embedding_key = f"{head}.weight", f"{embedding}.weight"
    if (head is not None and head_key in state and embedding_key in state
            and torch.equal(state[head_key], state[embedding_key])):
        state = {key: value for key, value in state.items() if key != head_key}
    return state
