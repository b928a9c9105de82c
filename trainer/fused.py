"""One bitsandbytes 8-bit AdamW kernel call per step over all trainable weights, held in flat buffers.

bitsandbytes' `AdamW8bit` launches its kernels once per parameter tensor and synchronises the device
after each (about 340 tensors and syncs per SD 1.5 ControlNet step), which makes a small-batch step
bound by host work. `FusedAdamW8bit` packs the trainable parameters (and their gradients) as views into
one flat buffer per (parameter group, state kind, dtype) and calls bitsandbytes' own kernels
(`optimizer_update_8bit_blockwise`, `optimizer_update_32bit`) once per buffer, with no sync.

Same math as `AdamW8bit`: every tensor starts at a multiple of bitsandbytes' 256-element state block,
so the blockwise quantisation sees the same blocks (the padding is zeros and never read), and tensors
under bitsandbytes' `min_8bit_size` (4096 elements) keep fp32 states in a buffer of their own, as there.

With bf16 weights (`--low-memory`) the update runs chunk by chunk in fp32 and the result is rounded
back to bf16 stochastically (unbiased: the expected stored weight equals the fp32 result), so updates
far smaller than a bf16 ulp still move the weights on average. Chunks keep the fp32 temporaries small.
"""

from __future__ import annotations

import math
import weakref

import torch

BLOCK = 256
"""bitsandbytes' blockwise state block (elements); every tensor's offset in a flat buffer is a multiple."""
MIN_8BIT = 4096
"""bitsandbytes' min_8bit_size: smaller tensors get fp32 states (AdamW8bit's default, kept)."""
CHUNK = 1 << 23
"""Elements per fp32 chunk of a stochastically rounded update (64 MiB of temporaries)."""


def padded(n: int) -> int:
    """`n` rounded up to a whole number of state blocks."""
    return -(-n // BLOCK) * BLOCK


def flat_parameter(params: list[torch.nn.Parameter]) -> torch.nn.Parameter:
    """One flat Parameter holding `params`, each now a view into it at a block-aligned offset."""
    p0 = params[0]
    flat = torch.zeros(sum(padded(p.numel()) for p in params), dtype=p0.dtype, device=p0.device)
    for p, offset in zip(params, offsets(params), strict=True):
        flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
        p.data = flat[offset:offset + p.numel()].view_as(p)
    return torch.nn.Parameter(flat, requires_grad=False)


def offsets(params: list[torch.Tensor]) -> list[int]:
    """Each tensor's offset in its flat buffer (every one starts a state block)."""
    out, at = [], 0
    for p in params:
        out.append(at)
        at += padded(p.numel())
    return out


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator) -> None:
    """Store fp32 `src` into bf16 `dst`, rounding up with probability equal to the cut-off fraction.

    Adding uniform random 16-bit integers to the low half of the fp32 bit pattern and truncating it is
    unbiased stochastic rounding (of the magnitude; the sign bit is untouched). `src` is overwritten.
    """
    bits = src.view(torch.int32)
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    bits.add_(noise).bitwise_and_(-65536)
    dst.copy_(src)  # exact: the low 16 bits are zero


def unwrapped(state: dict) -> dict:
    """A bitsandbytes per-tensor state with its FSDP-wrapped quantisation tensors lifted back to the top."""
    out = {k: v for k, v in state.items() if not isinstance(v, dict)}
    for v in state.values():
        if isinstance(v, dict):
            out.update(v)
    return out


class FiniteGuard:
    """GradScaler's part for bf16 gradients (its CUDA unscale kernel takes none): scale 1, skip non-finite steps.

    bf16 needs no loss scaling; what remains is GradScaler's refusal to step on inf/NaN gradients,
    checked with one min/max per flat gradient (no gradient-sized temporary) and one sync per step, or,
    when the loop clipped the gradients, on the norm it computed over them (trainer.loop.clip_gradients).
    """

    norm: torch.Tensor | None = None
    """The gradients' global norm from this step's clipping; non-finite when some gradient is. Used once."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as is."""
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to unscale."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step() unless a gradient holds inf or NaN."""
        ends, self.norm = self.norm, None
        if ends is None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            ends = torch.stack([x for g in grads for x in torch.aminmax(g)]).float()
        if bool(torch.isfinite(ends).all()):
            optimizer.step()

    def update(self) -> None:
        """The scale stays 1."""

    def get_scale(self) -> float:
        """Always 1."""
        return 1.0

    def state_dict(self) -> dict:
        """Nothing to keep but the (constant) scale."""
        return {"scale": 1.0}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class FusedAdamW8bit(torch.optim.Optimizer):
    """AdamW with bitsandbytes' 8-bit blockwise states, one kernel call per flat buffer (see module doc).

    Its param_groups hold the flat Parameters, so GradScaler.unscale_ and clip_grad_norm_ over
    `flat_params()` each touch a few large tensors. The flat gradients are allocated when backward
    produces the first gradient of a step (a post-accumulate hook), not before: allocated up front
    they would sit beside the forward pass's activations (+1.1 GiB peak on SD 1.5 at the tutorial
    flags, measured). From then on every parameter's .grad is a view into them, which backward
    accumulates into in place; zero_grad(set_to_none=True) frees them again.

    The hooks are needed for that first gradient only: once the views are attached they are removed
    (all but the firing parameter's, whose hooks autograd is iterating), and zero_grad(set_to_none=True)
    puts them back, so later gradients of the step and later accumulation passes call no Python
    (340 firings a pass on SD 1.5's ControlNet otherwise).
    """

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, stochastic_rounding: bool = True, seed: int = 0):
        self.model_params = [p for g in groups for p in g["params"]]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.members: list[list[torch.nn.Parameter]] = []
        self.member_offsets: list[list[int]] = []
        """Each member's offset in its flat buffer (fixed: computed once, used at every step's first gradient)."""
        self.attached = False
        """Whether the parameters' .grad are views into allocated flat gradients (trainer.fused._on_grad)."""
        super().__init__(self._flat_groups(groups), defaults)
        hook = weakref.WeakMethod(self._on_grad)  # a strong one would tie optimizer and models in a cycle
        self._fire = lambda param: hook() and hook()(param)  # that tensors' hooks keep from the collector
        self._handles = [p.register_post_accumulate_grad_hook(self._fire) for p in self.model_params]
        """Each parameter's post-accumulate-grad hook (removed from its dict between attaching and zero_grad)."""
        device = self.model_params[0].device
        self.stochastic_rounding = stochastic_rounding
        self.rounding = torch.Generator(device=device).manual_seed(seed)
        import bitsandbytes.functional as F

        self._F = F
        self._qmaps = (F.create_dynamic_map(signed=True).to(device), F.create_dynamic_map(signed=False).to(device))

    def _flat_groups(self, groups: list[dict]) -> list[dict]:
        """Each group split by state kind (8-bit / fp32) and dtype, each part packed into one flat Parameter."""
        out = []
        for i, g in enumerate(groups):
            parts: dict[tuple, list] = {}
            for p in g["params"]:
                parts.setdefault((p.numel() >= MIN_8BIT, p.dtype), []).append(p)
            extra = {k: v for k, v in g.items() if k != "params"}
            for (eight, _), ps in parts.items():
                self.members.append(ps)
                self.member_offsets.append(offsets(ps))
                out.append({**extra, "params": [flat_parameter(ps)], "bits": 8 if eight else 32, "origin": i, "sizes": [p.numel() for p in ps]})
        return out

    def flat_params(self) -> list[torch.nn.Parameter]:
        """The flat Parameters (their .grad the flat gradients): what unscaling and clipping should touch."""
        return [g["params"][0] for g in self.param_groups]

    def _arm(self) -> None:
        """Every parameter's hook back in its dict: the next gradient attaches the views.

        A store into the dict the handle removed it from, with the handle's id: 340 hooks re-armed in 0.17 ms
        against 2.0 ms for removing and registering them anew (CPU, measured), so arming never costs more
        than the 340 firings it saves. A parameter whose hook dict was replaced gets a new registration.
        """
        for i, (p, handle) in enumerate(zip(self.model_params, self._handles, strict=True)):
            # RemovableHandle's fields are torch internals: a torch without them takes the registration path
            hooks = getattr(handle, "hooks_dict_ref", lambda: None)()
            if hooks is None or hooks is not getattr(p, "_post_accumulate_grad_hooks", None) or not hasattr(handle, "id"):
                self._handles[i] = p.register_post_accumulate_grad_hook(self._fire)
            else:
                hooks[handle.id] = self._fire

    def _disarm(self, firing: torch.Tensor) -> None:
        """Remove the hooks but the firing parameter's (removing an entry of the dict autograd iterates is unsafe)."""
        for p, handle in zip(self.model_params, self._handles, strict=True):
            if p is not firing:
                handle.remove()

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        """Backward's first gradient of a step: give every parameter its view of a fresh flat gradient."""
        if self.attached:
            return  # every .grad is a view already (only the one hook _disarm leaves gets here)
        self.attached = True
        self._disarm(param)
        for flat, params, starts in zip(self.flat_params(), self.members, self.member_offsets, strict=True):
            if flat.grad is None:
                flat.grad = torch.zeros_like(flat)
            for p, offset in zip(params, starts, strict=True):
                view = flat.grad[offset:offset + p.numel()].view_as(p)
                if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)  # a gradient accumulated before the views existed
                p.grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Free the flat gradients (set_to_none, the default) or zero them in place."""
        self.attached = self.attached and not set_to_none
        if not self.attached:
            self._arm()
        for flat, params in zip(self.flat_params(), self.members, strict=True):
            if flat.grad is None:
                continue
            if set_to_none:
                flat.grad = None
                for p in params:
                    p.grad = None
            else:
                flat.grad.zero_()

    def _init_state(self, group: dict, flat: torch.Tensor) -> dict:
        """Zero moments: uint8 codes with one fp32 absmax per block, or fp32 moments for small tensors."""
        st = self.state[flat]
        st["step"] = 0
        if group["bits"] == 8:
            blocks = flat.numel() // BLOCK
            for i in (1, 2):
                st[f"state{i}"] = torch.zeros(flat.numel(), dtype=torch.uint8, device=flat.device)
                st[f"absmax{i}"] = torch.zeros(blocks, dtype=torch.float32, device=flat.device)
        else:
            for i in (1, 2):
                st[f"state{i}"] = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every flat buffer: a kernel call each (a few per chunk for bf16 weights)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            flat = group["params"][0]
            if flat.grad is None:  # no backward since zero_grad: nothing to do, as AdamW8bit skips grad None
                continue
            st = self.state[flat] or self._init_state(group, flat)
            st["step"] += 1
            if flat.dtype == torch.bfloat16 and self.stochastic_rounding:
                self._update_rounded(group, flat, st)
            else:
                self._update(group, st, flat.grad, flat, 0, flat.numel())
        return loss

    def _update_rounded(self, group: dict, flat: torch.Tensor, st: dict) -> None:
        """The update in fp32 chunks, each stochastically rounded back into the bf16 weights."""
        for lo in range(0, flat.numel(), CHUNK):
            hi = min(flat.numel(), lo + CHUNK)
            p32 = flat[lo:hi].float()
            self._update(group, st, flat.grad[lo:hi].float(), p32, lo, hi)
            stochastic_round_(flat[lo:hi], p32, self.rounding)

    def _update(self, group: dict, st: dict, g: torch.Tensor, p: torch.Tensor, lo: int, hi: int) -> None:
        """bitsandbytes' AdamW kernel over elements [lo, hi) of a buffer (lo, hi on block boundaries)."""
        (b1, b2), F = group["betas"], self._F
        if group["bits"] == 8:
            blocks = slice(lo // BLOCK, math.ceil(hi / BLOCK))
            F.optimizer_update_8bit_blockwise(
                "adam", g, p, st["state1"][lo:hi], st["state2"][lo:hi], b1, b2, 0.0, 0.0, group["eps"],
                st["step"], group["lr"], self._qmaps[0], self._qmaps[1], st["absmax1"][blocks],
                st["absmax2"][blocks], group["weight_decay"], gnorm_scale=1.0)
        else:
            F.optimizer_update_32bit("adam", g, p, st["state1"][lo:hi], b1, group["eps"], st["step"], group["lr"],
                                     st["state2"][lo:hi], b2, 0.0, 0.0, group["weight_decay"], 1.0)

    def state_dict(self) -> dict:
        """PyTorch's optimizer state dict plus the stochastic-rounding generator (exact resume)."""
        sd = super().state_dict()
        sd["rounding_rng"] = self.rounding.get_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore states keeping their dtypes (uint8 codes, fp32 absmax); per-tensor AdamW8bit states convert."""
        saved = state_dict["param_groups"]
        if sum(len(g["params"]) for g in saved) == len(self.model_params) != len(self.param_groups):
            state_dict = self._from_per_tensor(state_dict)
            saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [1] * len(self.param_groups) or \
                [g.get("sizes") for g in saved] != [g["sizes"] for g in self.param_groups]:
            raise ValueError("the checkpoint's optimizer state does not fit these parameters (another model or "
                             "--unlock-decoder setting?); resume with the flags it was saved with")
        for group, sg in zip(self.param_groups, saved, strict=True):
            group.update({k: v for k, v in sg.items() if k != "params"})
            flat = group["params"][0]
            st = state_dict["state"].get(sg["params"][0], {})
            self.state[flat] = {k: (v.to(flat.device, copy=True) if torch.is_tensor(v) else v) for k, v in st.items()}
        if "rounding_rng" in state_dict:
            self.rounding.set_state(state_dict["rounding_rng"].cpu())

    def _from_per_tensor(self, sd: dict) -> dict:
        """A state dict of bitsandbytes' AdamW8bit (one entry per tensor) in this optimizer's flat layout.

        Block-aligned offsets make it a copy: each tensor's codes and absmax land at its offset.
        """
        per_tensor = [unwrapped(sd["state"].get(i, {})) for g in sd["param_groups"] for i in g["params"]]
        new_state, groups = {}, []
        base = {id(p): s for p, s in zip(self.model_params, per_tensor, strict=True)}
        for gi, group in enumerate(self.param_groups):
            new_state[gi] = self._pack_state(group, [base[id(p)] for p in self.members[gi]])
            old = sd["param_groups"][group["origin"]]
            groups.append({**{n: v for n, v in old.items() if n != "params"}, "params": [gi],
                           **{n: group[n] for n in ("bits", "origin", "sizes")}})
        return {"state": new_state, "param_groups": groups}

    def _pack_state(self, group: dict, states: list[dict]) -> dict:
        """Per-tensor states concatenated at block-aligned offsets (zeros where a tensor had none)."""
        flat = group["params"][0]
        st = self._init_state(group, flat)
        st["step"] = max((s.get("step", 0) for s in states), default=0)
        offset = 0
        for s, n in zip(states, group["sizes"], strict=True):
            for key in ("state1", "state2"):
                if key in s:
                    st[key][offset:offset + n].copy_(s[key].reshape(-1))
            for key in ("absmax1", "absmax2"):
                if key in s and group["bits"] == 8:
                    st[key][offset // BLOCK:offset // BLOCK + s[key].numel()].copy_(s[key])
            offset += padded(n)
        del self.state[flat]
        return st
