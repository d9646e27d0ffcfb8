"""ViT and DeiT (timm ``VisionTransformer``): attention matmuls, residual stream, GELU, final norm."""
from __future__ import annotations

import torch
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..quant.layers import TensorQuantizer
from .base import PLACEHOLDER, Adapter, QuantAdd, add_qk_av_matmuls, morph, quantize_inputs_of


class QuantViTAttention(Attention):
    """timm 1.0.31 ``Attention.forward`` (unfused path) with both matmuls quantized, and in the full
    protocol the softmax input."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = self.matmul_qk(q, k.transpose(-2, -1))
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.softmax_in(attn).softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = self.matmul_av(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantViTBlock(Block):
    """timm ``Block`` with the residual additions' inputs quantized (full protocol). The quantized
    residual stream ``x`` also feeds ``norm1``/``norm2``, so it is quantized once for both uses."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.residual1.x_quant(x)
        branch = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.residual1.b_quant(branch)
        x = self.residual2.x_quant(x)
        x = x + self.residual2.b_quant(self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))
        return x


def attach_attention_matmuls(attn: nn.Module, name: str) -> None:
    """Add the two matmul modules (q @ k^T and attn @ v) and an identity softmax-input slot."""
    attn.fused_attn = False
    add_qk_av_matmuls(attn, name)
    attn.softmax_in = nn.Identity()


class ViTAdapter(Adapter):
    family = "vit"

    def applies_to(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def prepare(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, Attention):
                m.fused_attn = False  # the explicit matmuls are what gets quantized

    def first_layers(self, model: nn.Module) -> list[nn.Module]:
        return [model.patch_embed.proj]

    def two_region_targets(self, model: nn.Module):
        out = []
        for b in model.modules():
            if isinstance(b, Block):
                out += [(b.mlp.fc2.in_quant, True), (b.attn.matmul_av.a_quant, False)]
        return out

    def softmax_inputs(self, model: nn.Module) -> list[TensorQuantizer]:
        # QuantViTAttention calls Tensor.softmax on its softmax_in slot, a TensorQuantizer in the full protocol
        return [b.attn.softmax_in for b in model.modules()
                if isinstance(b, Block) and isinstance(getattr(b.attn, "softmax_in", None), TensorQuantizer)]

    def trunk(self, model: nn.Module):
        def stem(x):
            return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

        def head(x):
            return model.forward_head(model.norm(x))

        return stem, list(model.blocks), head

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
        return [(p, layer) for b in model.modules() if isinstance(b, Block)
                for p, layer in ((b.norm1, b.attn.qkv), (b.norm2, b.mlp.fc1))]

    def post_gelu_linears(self, model: nn.Module) -> list[nn.Linear]:
        return [b.mlp.fc2 for b in model.modules() if isinstance(b, Block)]

    def qkv_attentions(self, model: nn.Module) -> list[nn.Module]:
        # timm's optional q/k norms, output norm and gate sit where the folded factors would have to pass
        return [b.attn for b in model.modules() if isinstance(b, Block) and isinstance(b.attn, Attention)
                and all(isinstance(getattr(b.attn, n, None), (nn.Identity, type(None)))
                        for n in ("q_norm", "k_norm", "norm")) and getattr(b.attn, "gate", None) is None]

    def attach_matmuls(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) is Attention:
                attach_attention_matmuls(m, names[m])
                morph(m, QuantViTAttention)

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) is Block:
                name = names[m]
                m.residual1 = QuantAdd(f"{name}.residual1", channel_axis=-1)
                m.residual2 = QuantAdd(f"{name}.residual2", channel_axis=-1)
                morph(m, QuantViTBlock)
            if isinstance(m, QuantViTAttention):
                m.softmax_in = TensorQuantizer(f"{names[m]}.softmax", "input", PLACEHOLDER)
        # GELU inputs (fc1 outputs) and the final norms; norm1/norm2 inputs are the residual stream above.
        quantize_inputs_of(model, names, (nn.GELU,))
        for norm in (model.norm, getattr(model, "fc_norm", None)):
            if isinstance(norm, nn.LayerNorm):
                quantize_inputs_of(norm, {norm: names[norm]}, (nn.LayerNorm,), ptf_axis=-1)
