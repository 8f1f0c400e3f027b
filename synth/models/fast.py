"""Exact, cheaper forms of network pieces for inference.

:class:`SubpixelUpConv` replaces "nearest-neighbour upsampling x2, then a 3x3x3 convolution" (MONAI's
``UpSample(mode="nontrainable", interp_mode="nearest")`` with a ``postconv``, used by the
``AutoencoderKL`` decoder) by work on the *low*-resolution input. Along one axis, with kernel taps
``w[-1], w[0], w[1]``::

    y[2i]   = w[-1] x[i-1] + (w[0] + w[1]) x[i]
    y[2i+1] = (w[-1] + w[0]) x[i] + w[1] x[i+1]

so the result is the same (to float rounding) for 8/27 of the multiply-adds: the decoder's two
upsampling convolutions are 57 % of its work at 2 mm, and the decoder takes a third less time. The two
formulas are one transposed convolution with stride 2, padding 1 and the 4 taps ``w[1]``,
``w[0] + w[1]``, ``w[-1] + w[0]``, ``w[-1]``, which is how it runs: oneDNN writes the interleaved output
in one pass. (Until 2026-12-01 it ran as eight 2x2x2 convolutions, one per output parity, written by
strided copies; on 2 AVX2 cores the 32-channel upsampling to 80 x 96 x 80 took 0.109 s that way against
0.075 s as one transposed convolution: ``benchmarks/bench_convs.py``.)

:class:`OneDNNConv3d` sends a float32 CPU 3D convolution to oneDNN whatever its size. PyTorch's own
choice (``ConvParams::use_mkldnn``) keeps a batch of one with a 3x3x3 kernel on its slow reference
path (``slow_conv3d_forward``) when ``N * C * D * H <= 20480``, a rule tuned for 2D images: every
convolution of the UNet on its 20 x 24 x 20 latent. That path was 63 % of an unguided UNet step; with
oneDNN the step takes about a third less (0.159 -> 0.110 s on 2 AVX2 cores, 0.133 -> 0.076 s with
AVX-512; ``benchmarks/bench_convs.py``), the same result to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["OneDNNConv3d", "SubpixelUpConv", "fuse_upsample_convs", "use_onednn_convs"]

# rows: the transposed kernel's taps 0..3; columns: which of the taps -1, 0, 1 add into each
_FOLD_T = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def _transposed_kernel(w: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (Cin, Cout, 4, 4, 4): the stride-2 transposed convolution equal to nearest x2
    upsampling followed by ``w`` (padding 1). Tap k of the 4 sums the 3x3x3 taps ``_FOLD_T[k]`` along each axis."""
    m = w.new_tensor(_FOLD_T)
    return torch.einsum("oiabc,xa,yb,zc->ioxyz", w, m, m, m).contiguous()


class SubpixelUpConv(torch.nn.Module):
    """Nearest upsampling x2 followed by a 3x3x3 convolution (padding 1), computed at low resolution.

    Args:
        conv: The ``Conv3d`` that follows the upsampling (kernel 3, stride 1, padding 1, no dilation,
            one group).
    """

    def __init__(self, conv: torch.nn.Conv3d):
        super().__init__()
        if conv.kernel_size != (3, 3, 3) or conv.stride != (1, 1, 1) or conv.padding != (1, 1, 1) \
                or conv.dilation != (1, 1, 1) or conv.groups != 1:
            raise ValueError("SubpixelUpConv needs a 3x3x3 convolution with stride 1, padding 1, one group")
        self.register_buffer("weight", _transposed_kernel(conv.weight.detach()))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # keeps the input's memory format (a channels-last decoder, synth.pipeline, stays channels-last)
        return F.conv_transpose3d(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                                  stride=2, padding=1)


def fuse_upsample_convs(module: torch.nn.Module) -> int:
    """Replace, in place, every MONAI nearest x2 ``UpSample`` + 3x3x3 post-convolution of a 3D network
    by a :class:`SubpixelUpConv`. Returns how many were replaced. For inference only (the new modules
    hold their weights as buffers)."""
    from monai.networks.blocks import UpSample

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, UpSample) and _is_nearest_x2_conv(child):
            setattr(module, name, SubpixelUpConv(child.postconv.conv))
            count += 1
        else:
            count += fuse_upsample_convs(child)
    return count


def _is_nearest_x2_conv(block) -> bool:
    up = getattr(block, "upsample_non_trainable", None)
    post = getattr(block, "postconv", None)
    conv = getattr(post, "conv", None)
    if not isinstance(up, torch.nn.Upsample) or not isinstance(conv, torch.nn.Conv3d):
        return False
    scale = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * 3
    if up.mode != "nearest" or tuple(float(s) for s in scale) != (2.0, 2.0, 2.0):
        return False
    if len(block) != 2 or set(dict(block.named_children())) != {"upsample_non_trainable", "postconv"}:
        return False
    if set(dict(post.named_children())) != {"conv"}:  # no norm / activation / dropout after the conv
        return False
    return conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1) \
        and conv.dilation == (1, 1, 1) and conv.groups == 1


class OneDNNConv3d(torch.nn.Conv3d):
    """A ``Conv3d`` that runs float32 inference on the CPU through oneDNN (``torch.mkldnn_convolution``);
    anything else (autocast, gradients, other dtypes or devices, non-zero padding modes) takes the
    ordinary path. Same parameters and state dict as ``Conv3d``."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()
                and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))):
            return torch.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def use_onednn_convs(module: torch.nn.Module) -> int:
    """Turn every plain ``Conv3d`` of ``module`` into an :class:`OneDNNConv3d`, in place (same
    parameters and state-dict keys). Returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is torch.nn.Conv3d:
            m.__class__ = OneDNNConv3d
            count += 1
    return count
