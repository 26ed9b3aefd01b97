"""torchrun / DistributedDataParallel plumbing.

``lesionseg train`` (or :func:`LesionSegLib.training.train`) run under
``torchrun --nproc_per_node N`` finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the
environment, joins the process group (NCCL on CUDA, gloo on CPU) and trains one shard
of every epoch per process. Only rank 0 writes checkpoints, logs and pictures.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device_type: str) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
            self.initialised_here = True

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def all_reduce_sum(self, tensor):
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_buffers(self, module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics): DDP
        broadcasts them before each forward, so after the last training step the ranks
        differ by one update; validation and checkpoints use rank 0's."""
        if not self.enabled:
            return
        import torch.distributed as dist
        for b in module.buffers():
            dist.broadcast(b.data, 0)

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.initialised_here = False
