"""Activation memory measured from the architecture, with no weights and no accelerator.

The network is built on the meta device (shapes and dtypes, no storage) and run forward (and
backward) at batch 1 and 2 under the settings a real run uses: the trainer's mixed precision, LoRA
adapters or full fine-tuning, gradient checkpointing. A ``TorchDispatchMode`` follows every storage
an operator creates until the last tensor on it dies (weak references, as
``torch.distributed._tools.mem_tracker`` does), so the live bytes at each point are known:

* ``saved``: what a forward pass leaves alive for its backward (the activations autograd keeps,
  half-precision copies of weights under autocast, the block inputs gradient checkpointing keeps);
* ``backward``: the peak above that during the backward (gradients of activations, the recomputed
  block of gradient checkpointing), with the parameters' gradients allocated beforehand, as they
  are from the second micro-batch of an accumulation on;
* ``forward``: the peak of a forward pass without gradient (sampling, the reference model).

Runs at batch 1 and 2 (and two passes in one autocast region) separate what grows with the
samples from what is paid per forward pass (autocast's half-precision copies of frozen weights,
which each pass makes again) and once per autocast region (its cached copies of trainable weights).

Mixed precision: ``torch.autocast`` works by dispatch keys of CUDA (or CPU) tensors and does nothing
to meta tensors, and the autograd engine needs a CUDA context to run a backward of (fake) CUDA
tensors. So CUDA autocast is emulated (``EmulatedAutocast``: its casting policy for the functions
these networks call, with its weight cache) on meta tensors; ``fake_cuda_forward_saved`` measures a
forward pass on fake CUDA tensors under the dispatcher's real autocast, and the tests check that
both agree.

Attention: on CPU, PyTorch's SDPA picks a kernel by what the CPU supports, and its math fallback
keeps the full (L x L) attention matrix for the backward. This module assumes what a CUDA run
does: a fused kernel (flash or memory-efficient) that keeps q, k, v, the output and a float32
log-sum-exp per query, and allocates a float32 accumulator of q's size in its backward. Every
``scaled_dot_product_attention`` call is replaced by that accounting while measuring, on every
device, so the numbers do not depend on the CPU they are measured on.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ---- live storage bytes -------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by operators while active and still alive; ``peak`` is their
    maximum. Storages that exist before (parameters, inputs) are registered with ``known`` and never
    counted, also when an operator returns a view of them."""

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def known(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), 0)

    def _add(self, storage, nbytes: int) -> None:
        key = id(storage)
        if key in self.sizes:
            return
        self.sizes[key] = nbytes
        self.refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self._add(storage, storage.nbytes())
        return out


# ---- fused attention, as a CUDA run executes it --------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """What a flash / memory-efficient SDPA kernel allocates and keeps; values are not computed."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        accumulator = q.new_empty(q.shape, dtype=torch.float32)  # the kernel's float32 dq accumulator
        del accumulator
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    emulated = EmulatedAutocast.active
    if emulated is not None:  # SDPA is on autocast's lower-precision list
        query, key, value = (emulated._cast(x, emulated.dtype) for x in (query, key, value))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        return _FusedAttention.apply(query, key, value)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@contextlib.contextmanager
def fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


# ---- CUDA autocast, emulated ------------------------------------------------------------------
# torch.autocast's CUDA policy (aten/src/ATen/autocast_mode.cpp) for the functions these networks
# call: the matrix products and convolutions run in the autocast dtype, normalizations, pointwise
# transcendental functions and upsampling in float32; everything else keeps its inputs' dtype.
def _lower_precision_functions():
    F = torch.nn.functional
    return {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv1d, torch.conv2d,
            torch.conv3d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
            torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.addbmm, torch.mv, torch.addmv, F.prelu}


def _float32_functions():
    F = torch.nn.functional
    return {F.group_norm, F.layer_norm, torch.group_norm, torch.layer_norm, F.interpolate, F.softmax, F.log_softmax, torch.softmax,
            torch.Tensor.softmax, torch.log_softmax, torch.Tensor.log_softmax, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log,
            torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.cumsum, torch.Tensor.cumsum, F.softplus,
            F.mse_loss, F.l1_loss, F.cosine_similarity, F.normalize, torch.norm, torch.Tensor.norm, torch.logsumexp, torch.sum, torch.Tensor.sum}


class EmulatedAutocast(torch.overrides.TorchFunctionMode):
    """CUDA autocast for tensors of any device (the meta device here): eligible (floating, not
    float64) tensor arguments of the listed functions are cast, and casts of leaf tensors that require
    grad (trainable weights) are cached for the region, as autocast's weight cache does."""

    active: "EmulatedAutocast | None" = None

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.lower, self.fp32 = _lower_precision_functions(), _float32_functions()
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.caching = True

    def end_region(self) -> None:
        """Leave the forward's region (its weight cache is dropped) but stay on for the backward: gradient
        checkpointing recomputes each block under the autocast state of its forward, in a region of its own."""
        self.cache.clear()
        self.caching = False

    def _cast(self, x, dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in (torch.float64, dtype):
            return x
        if self.caching and x.is_leaf and x.requires_grad and torch.is_grad_enabled():
            hit = self.cache.get(id(x))
            if hit is None or hit[0] is not x:
                hit = (x, x.to(dtype))
                self.cache[id(x)] = hit
            return hit[1]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.dtype if func in self.lower else torch.float32 if func in self.fp32 else None
        if dtype is not None:
            cast = lambda v: [self._cast(t, dtype) for t in v] if isinstance(v, (list, tuple)) else self._cast(v, dtype)
            args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def __enter__(self):
        self._outer, EmulatedAutocast.active = EmulatedAutocast.active, self
        super().__enter__()
        return self

    def __exit__(self, *exc):
        EmulatedAutocast.active = self._outer
        self.cache.clear()
        return super().__exit__(*exc)


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None):
    """The trainer's mixed precision (``accelerate``'s CUDA autocast) for meta tensors; None: off.
    Yields the emulation (or None)."""
    if dtype is None:
        yield None
        return
    with EmulatedAutocast(dtype) as mode:
        yield mode


# ---- the measurements ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """How a network runs: its weights' dtype and the autocast dtype (None: no mixed precision)."""

    weights: str
    autocast: str | None = None

    @property
    def weight_dtype(self) -> torch.dtype:
        return DTYPES[self.weights]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.autocast] if self.autocast else None


def unet_inputs(config: dict, side: int, batch: int, dtype: torch.dtype, device="meta") -> dict:
    """What ``DiffusionModel.denoise`` passes the UNet for ``batch`` samples (SD or SDXL layout)."""
    empty = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)
    kwargs = {
        "sample": empty(batch, config.get("in_channels", 4), side, side),
        "timestep": torch.zeros(batch, dtype=torch.long, device=device),
        "encoder_hidden_states": empty(batch, 77, int(config["cross_attention_dim"])),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
        kwargs["added_cond_kwargs"] = {"text_embeds": empty(batch, pooled), "time_ids": empty(batch, 6)}
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = empty(batch, int(config["time_cond_proj_dim"]))
    return kwargs


def _leaves(x):
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def checkpoint_function(autocast_dtype: torch.dtype | None):
    """diffusers' gradient checkpointing function (non-reentrant ``torch.utils.checkpoint``), which
    recomputes a block under the autocast state of its forward: here the emulated autocast, without
    its weight cache (a recomputation is an autocast region of its own)."""
    from torch.utils.checkpoint import checkpoint

    def recompute():
        mode = EmulatedAutocast(autocast_dtype)
        mode.caching = False
        return mode

    def run(module, *args):
        if autocast_dtype is None:
            return checkpoint(module.__call__, *args, use_reentrant=False)
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), recompute()))

    return run


def build_unet(config: dict, lora_rank: int | None, lora_targets, checkpointing: bool, dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None):
    """The UNet on the meta device as the trainer sets it up: LoRA adapters (only they train) or
    every weight trainable, gradient checkpointing, train mode."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(dtype)
    if lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=int(lora_rank), lora_alpha=int(lora_rank), init_lora_weights="gaussian", target_modules=list(lora_targets)))
    else:
        unet.requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_function(autocast_dtype))
    return unet.train()


def unet_training(config: dict, side: int, setting: Setting, lora_rank: int | None, lora_targets, checkpointing: bool) -> dict:
    """Bytes of gradient-carrying UNet passes: ``saved = per_region + passes * per_pass + samples *
    per_sample`` stay alive until the backward, which peaks ``backward_const + backward_per_sample *
    samples`` above that (samples of the largest pass); the forward itself peaks ``forward_const +
    forward_per_sample * samples`` above what it keeps (a layer's or, under gradient checkpointing, a
    block's intermediates; autocast's cache of cast weights, freed when the region ends)."""
    unet = build_unet(config, lora_rank, lora_targets, checkpointing, setting.weight_dtype, setting.autocast_dtype)
    trainable = [p for p in unet.parameters() if p.requires_grad]

    def run(batch: int, passes: int) -> tuple[int, int]:
        for p in trainable:  # gradients exist already, as from the second micro-batch of an accumulation on
            p.grad = torch.zeros_like(p)
        inputs = [unet_inputs(config, side, batch, setting.weight_dtype) for _ in range(passes)]
        tracker = LiveBytes()
        tracker.known([*unet.parameters(), *unet.buffers(), *(p.grad for p in trainable), *(t for i in inputs for t in _leaves(i))])
        with fused_attention(), tracker, autocast(setting.autocast_dtype) as mixed:
            outs = [unet(**kw).sample for kw in inputs]
            loss = sum(o.float().square().mean() for o in outs)
            if mixed is not None:
                mixed.end_region()
            saved = tracker.current
            forward = tracker.peak - saved
            tracker.reset_peak()
            loss.backward()
            extra = tracker.peak - saved
            del loss, outs
        for p in trainable:
            p.grad = None
        return saved, extra, forward

    (s_a, b_a, f_a), (s_b, b_b, f_b), (s_c, _, f_c) = run(1, 1), run(2, 1), run(1, 2)
    per_sample, per_pass = s_b - s_a, max(s_c - s_b, 0)
    forward_per_sample = max(f_b - f_a, 0)
    return {
        "per_sample": per_sample,
        "per_pass": per_pass,
        "per_region": max(s_a - per_pass - per_sample, 0),
        "backward_per_sample": max(b_b - b_a, 0),
        "backward_const": max(2 * b_a - b_b, 0),
        "forward_per_sample": forward_per_sample,
        "forward_const": max(max(f_a, f_c) - forward_per_sample, 0),
    }


def unet_encoder_training(config: dict, side: int, setting: Setting, checkpointing: bool) -> dict:
    """``unet_training`` for a UNet's encoder alone (conv_in, the time and added embeddings, the down and
    mid blocks, every weight trainable): a latent reward model built from a UNet (LaSRO's surrogate)."""
    unet = build_unet(config, None, (), checkpointing, setting.weight_dtype, setting.autocast_dtype)
    trainable = [p for p in unet.parameters() if p.requires_grad]

    def encoder(kw):
        emb = unet.get_time_embed(sample=kw["sample"], timestep=kw["timestep"])
        emb = unet.time_embedding(emb)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=kw["encoder_hidden_states"], added_cond_kwargs=kw.get("added_cond_kwargs") or {})
        emb = emb + aug if aug is not None else emb
        h = unet.conv_in(kw["sample"])
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=kw["encoder_hidden_states"])
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb, encoder_hidden_states=kw["encoder_hidden_states"]) if getattr(unet.mid_block, "has_cross_attention", False) else unet.mid_block(h, emb)
        return h

    def run(batch: int, passes: int) -> tuple[int, int]:
        for p in trainable:
            p.grad = torch.zeros_like(p)
        inputs = [unet_inputs(config, side, batch, setting.weight_dtype) for _ in range(passes)]
        tracker = LiveBytes()
        tracker.known([*unet.parameters(), *unet.buffers(), *(p.grad for p in trainable), *(t for i in inputs for t in _leaves(i))])
        with fused_attention(), tracker, autocast(setting.autocast_dtype) as mixed:
            loss = sum(encoder(kw).float().mean() for kw in inputs)
            if mixed is not None:
                mixed.end_region()
            saved = tracker.current
            tracker.reset_peak()
            loss.backward()
            extra = tracker.peak - saved
            del loss
        for p in trainable:
            p.grad = None
        return saved, extra

    (s_a, b_a), (s_b, b_b), (s_c, _) = run(1, 1), run(2, 1), run(1, 2)
    per_sample, per_pass = s_b - s_a, max(s_c - s_b, 0)
    return {
        "per_sample": per_sample, "per_pass": per_pass, "per_region": max(s_a - per_pass - per_sample, 0),
        "backward_per_sample": max(b_b - b_a, 0), "backward_const": max(2 * b_a - b_b, 0),
    }


def forward_peak(module: torch.nn.Module, make_inputs, call, setting: Setting) -> dict:
    """Peak live bytes of a forward pass without gradient, at batch 1 and 2: ``const + per_sample * n``."""
    module = module.to(setting.weight_dtype).requires_grad_(False).eval()

    def run(batch: int) -> int:
        inputs = make_inputs(batch)
        tracker = LiveBytes()
        tracker.known([*module.parameters(), *module.buffers(), *_leaves(inputs)])
        with fused_attention(), tracker, torch.no_grad(), autocast(setting.autocast_dtype):
            out = call(module, inputs)
            del out
        return tracker.peak

    one, two = run(1), run(2)
    return {"per_sample": two - one, "const": max(2 * one - two, 0)}


def unet_forward(config: dict, side: int, setting: Setting) -> dict:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return forward_peak(unet, lambda b: unet_inputs(config, side, b, setting.weight_dtype), lambda m, kw: m(**kw).sample, setting)


def vae_decode(config: dict, side: int, setting: Setting) -> dict:
    """``DiffusionModel.decode``: latents (n, C, side, side) to images."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    make = lambda b: torch.empty(b, int(config.get("latent_channels", 4)), side, side, dtype=setting.weight_dtype, device="meta")
    return forward_peak(vae, make, lambda m, z: m.decode(z).sample, setting)


def vae_encode(config: dict, resolution: int, setting: Setting) -> dict:
    """``DiffusionModel.encode``: images (n, 3, R, R) to the posterior mean (streamed pairs, target images)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    make = lambda b: torch.empty(b, int(config.get("in_channels", 3)), resolution, resolution, dtype=setting.weight_dtype, device="meta")
    return forward_peak(vae, make, lambda m, x: m.encode(x).latent_dist.mean, setting)


# ---- a cross-check of the emulation -------------------------------------------------------------
def fake_cuda_forward_saved(config: dict, side: int, setting: Setting, lora_rank: int | None, lora_targets) -> int:
    """Bytes a gradient-carrying UNet pass at batch 1 leaves for its backward, measured on fake CUDA
    tensors (``FakeTensorMode``) under the dispatcher's own CUDA autocast, which works without a GPU
    for a forward pass (not for a backward: the autograd engine wants a CUDA context). The emulated
    autocast on the meta device is checked against it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    unet = build_unet(config, lora_rank, lora_targets, False, setting.weight_dtype)
    mode = FakeTensorMode()
    memo: dict[int, torch.Tensor] = {}

    def fake(t):
        if id(t) not in memo:
            with mode:
                new = torch.empty(t.shape, dtype=t.dtype, device="cuda")
            memo[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
        return memo[id(t)]

    for m in unet.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = fake(p)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = fake(b)
    with mode:
        inputs = unet_inputs(config, side, 1, setting.weight_dtype, device="cuda")
    tracker = LiveBytes()
    tracker.known([*unet.parameters(), *unet.buffers(), *_leaves(inputs)])
    device, dtype = "cuda", setting.autocast_dtype
    prev = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    with fused_attention(), mode, tracker:
        torch.set_autocast_enabled(device, True)  # torch.autocast switches itself off where no GPU is present
        torch.set_autocast_dtype(device, dtype)
        torch.autocast_increment_nesting()
        try:
            loss = unet(**inputs).sample.float().square().mean()  # the loss unet_training takes
        finally:
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()
            torch.set_autocast_enabled(device, prev[0])
            torch.set_autocast_dtype(device, prev[1])
        saved = tracker.current
        del loss
    return saved
