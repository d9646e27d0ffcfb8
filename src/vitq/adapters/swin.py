"""Swin (timm ``SwinTransformer``): window attention with relative position bias and the shifted-window
mask, residual stream, GELU, patch-merging and final norms."""
from __future__ import annotations

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from .base import Adapter, QuantAdd, add_qk_av_matmuls, morph, quantize_inputs_of


class QuantWindowAttention(WindowAttention):
    """timm 1.0.31 ``WindowAttention.forward`` (unfused path) with both matmuls quantized. The relative
    position bias and the shift mask are added in float before the softmax, as in the original."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = self.matmul_qk(q, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)  # an nn.Softmax module: the full protocol quantizes its input by hook
        attn = self.attn_drop(attn)
        x = self.matmul_av(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class QuantSwinBlock(SwinTransformerBlock):
    """``SwinTransformerBlock`` with the residual additions' inputs quantized (full protocol)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self.residual1.x_quant(x)
        x = x + self.residual1.b_quant(self.drop_path1(self._attn(self.norm1(x))))
        x = x.reshape(B, -1, C)
        x = self.residual2.x_quant(x)
        x = x + self.residual2.b_quant(self.drop_path2(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)


class SwinAdapter(Adapter):
    family = "swin"

    def applies_to(self, model: nn.Module) -> bool:
        return isinstance(model, SwinTransformer)

    def prepare(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, WindowAttention):
                m.fused_attn = False

    def first_layers(self, model: nn.Module) -> list[nn.Module]:
        return [model.patch_embed.proj]

    def trunk(self, model: nn.Module):
        # timm's SwinTransformerStage is downsample (PatchMerging or Identity) then its blocks, on NHWC
        # features; flattening the stages gives a plain sequence, with each patch merging as its own step.
        def head(x):
            return model.forward_head(model.norm(x))

        steps: list[nn.Module] = []
        for stage in model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                steps.append(stage.downsample)
            steps.extend(stage.blocks)
        return model.patch_embed, steps, head

    def two_region_targets(self, model: nn.Module):
        out = []
        for b in model.modules():
            if isinstance(b, SwinTransformerBlock):
                out += [(b.mlp.fc2.in_quant, True), (b.attn.matmul_av.a_quant, False)]
        return out

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
        pairs = []
        for m in model.modules():
            if isinstance(m, SwinTransformerBlock):
                pairs += [(m.norm1, m.attn.qkv), (m.norm2, m.mlp.fc1)]
            elif isinstance(m, PatchMerging):
                pairs.append((m.norm, m.reduction))
        return pairs

    def post_gelu_linears(self, model: nn.Module) -> list[nn.Linear]:
        return [b.mlp.fc2 for b in model.modules() if isinstance(b, SwinTransformerBlock)]

    def qkv_attentions(self, model: nn.Module) -> list[nn.Module]:
        # WindowAttention: qkv laid out [3, heads, head_dim]; the relative position bias and the shift mask
        # are added to the logits, which leaves a per-row constant (what the q/k shift adds) harmless
        return [b.attn for b in model.modules() if isinstance(b, SwinTransformerBlock)]

    def attach_matmuls(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) is WindowAttention:
                m.fused_attn = False
                add_qk_av_matmuls(m, names[m])
                morph(m, QuantWindowAttention)

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) is SwinTransformerBlock:
                m.residual1 = QuantAdd(f"{names[m]}.residual1", channel_axis=-1)
                m.residual2 = QuantAdd(f"{names[m]}.residual2", channel_axis=-1)
                morph(m, QuantSwinBlock)
        quantize_inputs_of(model, names, (nn.GELU, nn.Softmax))
        # Norms whose input is not the (already quantized) residual stream: patch merging and the final norm.
        merge_norms = [m.norm for m in model.modules() if isinstance(m, PatchMerging)]
        for norm in merge_norms + [model.norm]:
            if isinstance(norm, nn.LayerNorm):
                quantize_inputs_of(norm, {norm: names[norm]}, (nn.LayerNorm,), ptf_axis=-1)
