"""The quantizer of one tensor: :class:`TensorQuantizer` holds a tensor's spec, its calibrated parameters and
its calibration state, and applies the pure quantizers (``quantizers.py``) to it."""
from __future__ import annotations

import torch
from torch import nn

from . import quantizers as Q
from .config import TensorSpec
from .observers import ActivationObserver, minmax_range, mse_range, percentile_range

MODES = ("off", "observe", "quant")


class TensorQuantizer(nn.Module):
    """Quantization of one tensor: its spec, its parameters, and its calibration state.

    Args:
        layer: name of the owning layer (what config rules match).
        role: ``weight``, ``input``, an operand name (``q``, ``k``, ``attn``, ``v``, ...) or ``act``.
        spec: bits, scheme, granularity.
        is_weight: weights are calibrated from the tensor itself, per channel along axis 0.
    """

    def __init__(self, layer: str, role: str, spec: TensorSpec, is_weight: bool = False):
        super().__init__()
        self.layer, self.role, self.spec, self.is_weight = layer, role, spec, is_weight
        self.mode = "off"
        self.observer: ActivationObserver | None = None
        self.output_fn = None  # set by a Linear owner for the layer-output MSE objective
        # Channel axis of a residual-stream tensor (ViT/Swin LayerNorm inputs, residual additions): such
        # tensors get a power-of-two-factor per-channel grid in the full protocol (see ptf_params).
        self.ptf_axis: int | None = None
        # Full protocol, QuantConfig.residual_token_shift: a PTF grid also gets a static power-of-two factor
        # per token position (buffer ``token_shift``, registered at calibration; quantizers.token_shift_params);
        # QuantConfig.gelu_token_shift does the same for a per-tensor uniform GELU-input grid
        self.token_shifts = False
        self.calls = 0  # forward calls since the last reset; tests use it to prove single quantization
        self.elements = 0  # activation values seen while observing (for the element-weighted average bits)
        # Parameters: shapes are known only after calibration (per tensor / per channel / per group).
        # Placeholders on the CPU: engine.prepare moves them beside the weights, calibration replaces them.
        self.register_buffer("scale", torch.ones((), device="cpu"))
        self.register_buffer("zero_point", torch.zeros((), device="cpu"))
        self.register_buffer("range_min", torch.zeros((), device="cpu"))
        self.register_buffer("range_max", torch.zeros((), device="cpu"))
        # Two-region scheme (OPT-m): ``scale`` is the coarse step, fine step = scale / 2^region_m.
        self.register_buffer("region_m", torch.zeros((), device="cpu"))
        self.register_buffer("boundary", torch.zeros((), device="cpu"))
        # Block reconstruction (methods/recon.py) makes the step size learnable for a while: a plain
        # tensor, not a registered parameter, so it never reaches a state dict.
        self.log_scale: torch.Tensor | None = None
        # QDrop (Wei et al. 2022): while reconstructing, each element keeps its float value with this
        # probability, so the learned steps do not over-fit one pattern of rounding errors. Applied only
        # on the differentiable path (inputs that require grad), never in calibration or evaluation.
        self.drop_prob = 0.0
        self.drop_generator: torch.Generator | None = None

    @property
    def channel_axis(self) -> int | None:
        """The axis along which this grid has one step per index (PTF channels), or None per tensor."""
        return self.ptf_axis if self.spec.granularity == "ptf" else None

    # ---- calibration
    def start_observing(self, method: str, seed: int) -> None:
        self.mode = "observe"
        axis = self.channel_axis
        self.set_token_shift(None)
        self.observer = ActivationObserver(method, seed=seed, axis=axis, per_position=self._uses_token_shifts)
        self.elements = 0

    @property
    def _uses_token_shifts(self) -> bool:
        if not self.token_shifts or self.spec.scheme != "uniform":
            return False
        return self.ptf_axis == -1 if self.spec.granularity == "ptf" else self.spec.granularity == "per_tensor"

    def set_token_shift(self, shift: torch.Tensor | None) -> None:
        """Adopt per-position power-of-two exponents (None: remove them). A buffer only while set, so the
        state of quantizers without token shifts (and older artifacts) is unchanged."""
        self._set_optional_buffer("token_shift", shift)

    def set_apot_channels(self, mask: torch.Tensor | None) -> None:
        """Adopt the output channels on the APoT grid of a ``mixed`` weight grid (None: remove). A buffer only
        while set, like ``token_shift``."""
        self._set_optional_buffer("apot_channels", mask)

    def _set_optional_buffer(self, name: str, value: torch.Tensor | None) -> None:
        """A float buffer that exists only while set (None removes it)."""
        if value is None:
            self._buffers.pop(name, None)
        elif name in self._buffers:
            setattr(self, name, value.detach().float().clone())
        else:
            self.register_buffer(name, value.detach().float().clone())

    @property
    def apot_mask(self) -> torch.Tensor | None:
        """The output channels on the APoT grid (bool, one per channel) of a ``mixed`` grid, else None."""
        m = self._buffers.get("apot_channels")
        return None if m is None else m > 0.5

    @property
    def token_shift_or_none(self) -> torch.Tensor | None:
        """The per-position exponents, or None for a grid without token shifts."""
        return self._buffers.get("token_shift")

    def token_factor(self, x: torch.Tensor) -> torch.Tensor | None:
        """``2^token_shift`` broadcast against ``x``, or None for a grid without token shifts."""
        shift = self.token_shift_or_none
        return None if shift is None else Q.token_factor(x, shift)

    def finish_observing(self, percentile: float, mse_objective: str) -> None:
        """Turn the observed statistics into parameters and switch to quantizing."""
        if self.observer is None or not self.observer.seen:
            raise RuntimeError(f"quantizer {self.name} saw no data during calibration")
        use_output = mse_objective == "output" and self.output_fn is not None and self.spec.scheme == "uniform"
        output_fn = self.output_fn if use_output else None
        if self.observer.per_position and self.observer.axis is None:
            # a per-tensor grid (a GELU input, QuantConfig.gelu_token_shift): the positions' shifts from their
            # largest positive values, since GELU is flat below about -4 and its negative inputs (down to -57
            # at many positions of ViT-Tiny's block 7, against +215 at four) need no range of their own; then
            # the clip search on the values divided by their positions' factors (what the grid sees)
            hi = self.observer.max.clamp(min=0.0)
            shift = Q.token_shift_params(torch.zeros_like(hi), hi)
            shift = shift if bool(shift.any()) else None  # none needed (DeiT-Tiny): exactly the plain grid
            self.set_token_shift(shift)
            lo, hi = self.observer.compute_range(self._clip_quantize, percentile, output_fn, token_shift=shift)
        else:
            lo, hi = self.observer.compute_range(self._clip_quantize, percentile, output_fn)
            if self.observer.per_position:
                # a PTF grid: ranges per position and channel give the positions' shifts, then each channel's
                # range over the positions as the channel grid sees them (divided by their factors)
                shift = Q.token_shift_params(lo, hi)
                # no position needs a shift (DeiT-Tiny): no buffer, so the grid is exactly the plain PTF one
                self.set_token_shift(shift if bool(shift.any()) else None)
                f = torch.exp2(shift).unsqueeze(-1)
                dims = tuple(range(lo.dim() - 1))
                lo, hi = (lo / f).amin(dim=dims), (hi / f).amax(dim=dims)
        self.set_range(lo, hi)
        self.observer = None
        self.mode = "quant"

    def calibrate_weight(self, w: torch.Tensor, method: str, percentile: float) -> None:
        """Set weight parameters from the weight itself (per tensor, per output channel or per group)."""
        w = w.detach().float()
        x, axis = self._weight_view(w)
        if self.spec.scheme == "mixed":  # each channel's better grid, each at its own best clip
            (lo_u, hi_u), (lo_a, hi_a) = (self._weight_range(x, axis, method, percentile, sch)
                                          for sch in ("uniform", "apot"))
            dims = Q.reduce_dims(x, axis)
            shape = [-1] + [1] * (x.dim() - 1)
            err_u = (self._clip_quantize(x, lo_u.reshape(shape), hi_u.reshape(shape), "uniform") - x).pow(2).mean(dims)
            err_a = (self._clip_quantize(x, lo_a.reshape(shape), hi_a.reshape(shape), "apot") - x).pow(2).mean(dims)
            mask = Q.split_channels(err_u, err_a, self.spec.apot_share)
            self.set_apot_channels(mask)
            lo, hi = torch.where(mask, lo_a, lo_u), torch.where(mask, hi_a, hi_u)
        else:
            lo, hi = self._weight_range(x, axis, method, percentile, self.spec.scheme)
        self.set_range(lo, hi)
        self.mode = "quant"

    def _weight_range(self, x: torch.Tensor, axis: int | None, method: str, percentile: float, scheme: str):
        if method == "minmax":
            return minmax_range(x, axis)
        if method == "percentile":
            return percentile_range(x, percentile, axis)
        return mse_range(x, lambda v, lo, hi: self._clip_quantize(v, lo, hi, scheme), axis)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Derive scale / zero point (or PoT exponent) from a clip range."""
        lo, hi = lo.detach().float().clone(), hi.detach().float().clone()
        self.range_min, self.range_max = lo, hi
        if self.spec.granularity == "ptf":
            self.scale, self.zero_point, _ = Q.ptf_params(lo, hi, self.spec.bits)
            return
        if self.spec.scheme == "pot":
            # Scale is 2^scale_exp, kept in ``scale``; zero_point unused (PoT grids are symmetric about 0).
            self.scale = Q.pot_scale_exponent(torch.maximum(lo.abs(), hi.abs()))
            self.zero_point = torch.zeros_like(self.scale)
        elif self.spec.scheme == "apot":
            self.scale = Q.apot_scale(torch.maximum(lo.abs(), hi.abs()), self.spec.bits)
            self.zero_point = torch.zeros_like(self.scale)
        else:
            self.scale, self.zero_point = Q.uniform_params(lo, hi, self.spec.bits, self._symmetric)
            mask = self.apot_mask
            if self.spec.scheme == "mixed" and mask is not None:  # the APoT channels' real-valued scales
                self.scale = torch.where(mask, Q.apot_scale(torch.maximum(lo.abs(), hi.abs()), self.spec.bits),
                                         self.scale)

    # ---- application
    @property
    def name(self) -> str:
        return f"{self.layer}.{self.role}"

    @property
    def _symmetric(self) -> bool:
        return self.spec.symmetric

    def _qrange(self) -> tuple[int, int]:
        return Q.int_range(self.spec.bits, self._symmetric)

    def _weight_view(self, w: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        g = self.spec.granularity
        if g == "per_group":
            return Q.to_groups(w, self.spec.group_size), 0
        return w, (0 if g == "per_channel" else None)

    def _clip_quantize(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       scheme: str | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` with clip range ``[lo, hi]`` (used by the MSE search) on this grid, or on
        ``scheme``'s (``uniform`` / ``apot``: the two halves of a ``mixed`` grid)."""
        scheme = scheme or self.spec.scheme
        if scheme == "apot":
            return Q.fake_quant_apot(x, Q.apot_scale(torch.maximum(lo.abs(), hi.abs()), self.spec.bits), self.spec.bits)
        if scheme == "pot":
            p = Q.pot_scale_exponent(torch.maximum(lo.abs(), hi.abs()))
            return Q.fake_quant_pot(x, p, self.spec.bits, signed=bool((x < 0).any()) or self.is_weight)
        scale, zp = Q.uniform_params(lo, hi, self.spec.bits, self._symmetric)
        qmin, qmax = self._qrange()
        return Q.dequantize_uniform(Q.quantize_uniform(x, scale, zp, qmin, qmax), scale, zp)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` with the calibrated parameters."""
        if self.is_weight:
            v, axis = self._weight_view(x)
            shape = [-1] + [1] * (v.dim() - 1) if axis is not None else []
            if self.spec.scheme == "pot":
                out = Q.fake_quant_pot(v, self.scale.reshape(shape), self.spec.bits, signed=True)
            elif self.spec.scheme == "apot":
                out = Q.fake_quant_apot(v, self.scale.reshape(shape), self.spec.bits)
            elif self.spec.scheme == "mixed" and self.apot_mask is not None:
                qmin, qmax = self._qrange()
                out = torch.where(self.apot_mask.reshape(shape),
                                  Q.fake_quant_apot(v, self.scale.reshape(shape), self.spec.bits),
                                  Q.fake_quant_uniform(v, self.scale, self.zero_point, qmin, qmax, axis=axis))
            else:
                qmin, qmax = self._qrange()
                out = Q.fake_quant_uniform(v, self.scale, self.zero_point, qmin, qmax, axis=axis)
            return out.reshape(x.shape)
        if self.spec.scheme == "pot":
            return Q.fake_quant_pot(x, self.scale, self.spec.bits, signed=bool(self.range_min < 0))
        if self.spec.scheme == "two_region":
            return Q.fake_quant_two_region(x, self.scale, int(self.region_m), self.boundary, self.spec.bits,
                                           signed_fine=self.spec.symmetric)
        qmin, qmax = self._qrange()
        axis = self.channel_axis
        f = self.token_factor(x)
        if f is not None:  # division and product by powers of two: exact in float
            return Q.fake_quant_uniform(x / f, self.scale, self.zero_point, qmin, qmax, axis=axis) * f
        return Q.fake_quant_uniform(x, self.scale, self.zero_point, qmin, qmax, axis=axis)

    def set_two_region(self, delta: float, m: int, boundary: float, signed_fine: bool) -> None:
        """Switch to the two-region scheme with coarse step ``delta``, ratio ``2^m`` and ``boundary``."""
        from dataclasses import replace

        self.spec = replace(self.spec, scheme="two_region", symmetric=signed_fine)
        dev = self.scale.device
        self.scale = torch.tensor(float(delta), device=dev)
        self.zero_point = torch.zeros((), device=dev)
        self.region_m = torch.tensor(float(m), device=dev)
        self.boundary = torch.tensor(float(boundary), device=dev)
        self.mode = "quant"

        self.mode = "quant"

    # ---- step-size learning (block reconstruction)
    @property
    def scale_learnable(self) -> bool:
        """Per-tensor uniform and two-region activation grids can learn their step size, and PTF grids one
        multiplier of all their steps (the steps' ratios stay); PoT grids keep their power-of-two scale, and
        weights are handled by their layer."""
        s = self.spec
        if self.is_weight or self.mode != "quant":
            return False
        if s.granularity == "ptf":
            return s.scheme == "uniform"
        return self.scale.numel() == 1 and s.scheme in ("uniform", "two_region")

    def begin_scale_learning(self) -> torch.Tensor:
        """Make the step size a learnable log-scale (returned, for the optimizer).

        For a PTF grid it is one log *multiplier* of every channel's step (0 = unchanged): the channels'
        steps keep their power-of-two ratios, so the integer LayerNorm / adder still aligns them with shifts.
        A per-head grid learns one multiplier the same way.
        """
        if not self.scale_learnable:
            raise ValueError(f"quantizer {self.name} ({self.spec.scheme}, {self.spec.granularity}) cannot learn its scale")
        if self.channel_axis is not None:
            # the steps are saved for backward: a plain copy, in case calibration made them under inference
            # mode (such tensors cannot be saved for backward)
            self.scale = self.scale.detach().clone()
            self.log_scale = torch.zeros((), requires_grad=True, device=self.scale.device)
        else:
            self.log_scale = self.scale.detach().log().clone().requires_grad_(True)
        return self.log_scale

    def end_scale_learning(self) -> None:
        """Adopt the learned step size as the quantizer's scale (and its clip range / region boundary)."""
        if self.log_scale is None:
            return
        if self.channel_axis is not None:
            self.set_uniform_scale(self.scale * self.log_scale.detach().exp())
            self.log_scale = None
            return
        new = self.log_scale.detach().exp().reshape(self.scale.shape)
        if self.spec.scheme == "two_region":
            # the boundary was chosen relative to the fine region's reach, which scales with the step
            self.boundary = self.boundary * (new / self.scale)
            self.scale = new
        else:
            self.set_uniform_scale(new)
        self.log_scale = None

    def set_ptf(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Adopt searched per-channel steps and zero points for a PTF grid (the clip range follows).

        The caller keeps the steps a shared base times powers of two (``methods/optm.py: search_ptf``).
        """
        if self.spec.granularity != "ptf":
            raise ValueError(f"quantizer {self.name} is {self.spec.granularity}, not a PTF grid")
        qmin, qmax = self._qrange()
        self.scale, self.zero_point = scale.detach().float().clone(), zero_point.detach().float().clone()
        self.range_min, self.range_max = (qmin - self.zero_point) * self.scale, (qmax - self.zero_point) * self.scale

    def set_uniform_scale(self, scale: torch.Tensor) -> None:
        """Adopt a new step for a uniform grid, keeping its zero points (the clip range follows)."""
        qmin, qmax = self._qrange()
        self.scale = scale.detach().reshape(self.scale.shape).clone()
        self.range_min, self.range_max = (qmin - self.zero_point) * self.scale, (qmax - self.zero_point) * self.scale

    def _fake_quant_ste(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization that lets gradients through: LSQ gradients for a learnable step, else the
        straight-through estimator for ``x`` (a quantizer downstream of learned ones must not stop them).
        With ``drop_prob`` > 0, that fraction of elements (drawn from ``drop_generator``) stays float."""
        if self.log_scale is None:
            xd = x.detach()
            out = x + (self.fake_quant(xd) - xd)
        elif self.spec.scheme == "two_region":
            scale = self.log_scale.exp()
            boundary = self.boundary * (scale.detach() / self.scale)
            out = Q.fake_quant_two_region_ste(x, scale, int(self.region_m), boundary, self.spec.bits,
                                              signed_fine=self.spec.symmetric)
        else:
            # uniform, per tensor or PTF (whose learned scale multiplies every step); token shifts
            # (PTF grids, GELU inputs) divide the rows first and multiply them back
            axis = self.channel_axis
            scale = self.scale * self.log_scale.exp() if axis is not None else self.log_scale.exp()
            qmin, qmax = self._qrange()
            f = self.token_factor(x)
            xs = x if f is None else x / f
            out = Q.fake_quant_uniform_ste(xs, scale, self.zero_point, qmin, qmax, axis=axis)
            out = out if f is None else out * f
        if self.drop_prob > 0:
            keep_float = torch.rand(x.shape, generator=self.drop_generator, device=x.device) < self.drop_prob
            out = torch.where(keep_float, x, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.mode == "quant" and x.requires_grad:
            return self._fake_quant_ste(x)
        if self.mode == "observe":
            self.observer.update(x)
            self.elements += x.numel()
            return x
        if self.mode == "off":
            return x
        return self.fake_quant(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Parameter shapes depend on the calibration (per tensor / channel / group): adopt the saved ones.
        for key in ("scale", "zero_point", "range_min", "range_max"):
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        if prefix + "token_shift" in state_dict:
            self.set_token_shift(torch.empty_like(state_dict[prefix + "token_shift"]))
        if prefix + "apot_channels" in state_dict:
            self.set_apot_channels(torch.empty_like(state_dict[prefix + "apot_channels"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.name}: {s.bits}b {s.scheme} {'sym' if s.symmetric else 'asym'} {s.granularity} mode={self.mode}"
