"""The training optimizer: AdamW, fused where torch can fuse it, with fp32 master weights for
bf16/fp16 models.

Why master weights. AdamW's first updates move each weight by about the learning rate. bf16
keeps 8 significant bits: a weight of magnitude 0.02 lies on a grid of 2**-13 (1.2e-4), so an
update of 2e-5 (the paper's lr for MinorSFT) is less than half a grid step and rounds back to
the weight it started from. Training SmolLM2-135M with MinorSFT at lr 2e-5 in pure bf16 left
97 % of its weights unchanged after 16 steps, and the loss stalled (`docs/performance.md`, "bf16
training"; `benchmarks/bench_bf16_updates.py`). With master weights the optimizer updates an
fp32 copy of every bf16/fp16 parameter and writes it back rounded: the model still runs in bf16
(forward, backward, activations, the same dtype as a bf16 cache), and small updates add up in
the copy until they move the bf16 weight. It is what mixed-precision trainers do (DeepSpeed's
bf16, FSDP's MixedPrecisionPolicy, which `--strategy fsdp` uses); `--dtype bf16-mixed` is the
other way round (fp32 weights throughout, bf16 only inside autocast).

The cost is memory: per bf16 parameter an fp32 copy (4 bytes), its fp32 gradient during the
step (4) and AdamW's two moments in fp32 (8 instead of 4): 20 bytes per parameter with the bf16
weight and gradient, against 8 without (`--no-master-weights`).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
# torch checks fused=True only at the first step(), so decide here: the devices this tool
# trains on, where torch has the kernel.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def decays(param: torch.nn.Parameter) -> bool:
    """Whether weight decay applies to `param`: to matrices (linear layers, embeddings), not to
    biases and normalisation gains, which are 1-D. transformers' Trainer, and so TRL, leave out
    the same ones (by name and module type); decaying a norm's gain pulls it towards 0, a
    layer's output scale, not towards a smaller model."""
    return param.ndim >= 2


def optimizer_order(named: list[tuple[str, torch.nn.Parameter]],
                    weight_decay: float) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable (name, parameter) pairs in the order the optimizer numbers them (its
    state_dict's keys, the master weights' order): as given, or with weight decay the decayed
    ones first (the first parameter group), then the others."""
    if not weight_decay:
        return list(named)
    return ([(n, p) for n, p in named if decays(p)]
            + [(n, p) for n, p in named if not decays(p)])


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
                   master_weights: bool = True) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999, eps 1e-8), fused where torch has a kernel for the device.

    `params` in `optimizer_order`. With weight decay, biases and norm gains go into a second
    parameter group without it (`decays`).

    The fused kernel updates each parameter in one pass instead of a dozen elementwise ones: on
    a 2-core CPU the SmolLM2-135M optimizer step took 0.06 s instead of 0.30 s
    (`benchmarks/cpu_probes.py optimizer`), and on a GPU it
    takes a few kernel launches instead of one per elementwise operation. TRL's trainers use it
    by default too (transformers' `adamw_torch_fused`). With `master_weights`, bf16/fp16
    parameters are updated through fp32 copies (`MasterWeightsAdamW`).
    """
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)
    settings = dict(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8,
                    fused=fused or None)
    groups = [{"params": params}]
    if weight_decay:
        groups = [group for group in (
            {"params": [p for p in params if decays(p)]},
            {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
        ) if group["params"]]
        if [id(p) for group in groups for p in group["params"]] != list(map(id, params)):
            raise ValueError("make_optimizer: give the parameters in optimizer_order")
    if master_weights and any(p.dtype in LOW_PRECISION for p in params):
        return MasterWeightsAdamW(groups, **settings)
    return torch.optim.AdamW(groups, **settings)


class MasterWeightsAdamW(torch.optim.AdamW):
    """AdamW on fp32 copies of the bf16/fp16 parameters; the model's parameters follow them.

    `step()` copies the model's gradients into the copies, runs AdamW on them and writes the
    updated copies back into the model's parameters (rounded to their dtype). fp32 parameters
    (LoRA adapters kept in fp32, say) are updated in place as by plain AdamW. The copies are
    part of `state_dict()`, so a resumed run continues from the exact fp32 values.
    """

    def __init__(self, params, **settings):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        # what AdamW updates: an fp32 copy of each low-precision parameter, fp32 ones as they
        # are, group by group
        master_groups = [{**group, "params": [
            p.detach().float().clone() if p.dtype in LOW_PRECISION else p
            for p in group["params"]]} for group in groups]
        self.masters = [m for group in master_groups for m in group["params"]]
        params = [p for group in groups for p in group["params"]]
        # (copy, model parameter) pairs of the low-precision parameters only
        self._pairs = [(m, p) for m, p in zip(self.masters, params, strict=True) if m is not p]
        super().__init__(master_groups, **settings)

    @torch.no_grad()
    def step(self, closure=None):
        with_grad = [(m, p) for m, p in self._pairs if p.grad is not None]
        for master, param in self._pairs:
            master.grad = torch.empty_like(master) if param.grad is not None else None
        if with_grad:  # one multi-tensor copy (with the cast), not one kernel per parameter
            torch._foreach_copy_([m.grad for m, _ in with_grad], [p.grad for _, p in with_grad])
        loss = super().step(closure)
        self._write_back()
        for master, _ in self._pairs:
            master.grad = None  # the fp32 gradients live only during the step
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for _, param in self._pairs:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict:
        state = super().state_dict()
        # The copies themselves, as torch's own state_dict gives its moments: no second fp32
        # copy of the model while a checkpoint is written.
        state["master_weights"] = [master.detach() for master, _ in self._pairs]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        if masters is None or len(masters) != len(self._pairs):
            raise ValueError("this optimizer state has no fp32 master weights for this model "
                             "(written by a run without them); resume with the settings that "
                             "wrote it")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for (master, _), saved in zip(self._pairs, masters, strict=True):
                master.copy_(saved)
            self._write_back()

    @torch.no_grad()
    def _write_back(self) -> None:
        if self._pairs:
            torch._foreach_copy_([p for _, p in self._pairs], [m for m, _ in self._pairs])
