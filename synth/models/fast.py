"""Exact, cheaper forms of network pieces for inference.

:class:`SubpixelUpConv` replaces "nearest-neighbour upsampling x2, then a 3x3x3 convolution" (MONAI's
``UpSample(mode="nontrainable", interp_mode="nearest")`` with a ``postconv``, used by the
``AutoencoderKL`` decoder) by eight 2x2x2 convolutions on the *low*-resolution input, one per output
parity, interleaved into the output. Along one axis, with kernel taps ``w[-1], w[0], w[1]``::

    y[2i]   = w[-1] x[i-1] + (w[0] + w[1]) x[i]
    y[2i+1] = (w[-1] + w[0]) x[i] + w[1] x[i+1]

so the result is the same (to float rounding) for 8/27 of the multiply-adds: the decoder's two
upsampling convolutions are 57 % of its work at 2 mm, and the decoder takes a third less time.

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

# Per output parity p along one axis: which of the 3 taps add into each of the 2 low-resolution taps.
_FOLD = (((0,), (1, 2)), ((0, 1), (2,)))


def _fold_kernel(w: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (8, Cout, Cin, 2, 2, 2): the 2x2x2 kernel of each output parity."""
    out = []
    for px in range(2):
        for py in range(2):
            for pz in range(2):
                k = w.new_zeros(*w.shape[:2], 2, 2, 2)
                for a, ia in enumerate(_FOLD[px]):
                    for b, ib in enumerate(_FOLD[py]):
                        for c, ic in enumerate(_FOLD[pz]):
                            k[:, :, a, b, c] = w[:, :, list(ia)][:, :, :, list(ib)][:, :, :, :, list(ic)].sum((2, 3, 4))
                out.append(k)
    return torch.stack(out)


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
        self.register_buffer("weight", _fold_kernel(conv.weight.detach()).contiguous())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, d, h, w = x.shape
        xp = F.pad(x, (1, 1, 1, 1, 1, 1))
        # The output in the input's memory format: a channels-last decoder (synth.pipeline) otherwise pays a
        # layout change on every interleaving write and again in the next layer (channels-last decode on
        # 2 AVX2 cores, benchmarks/bench_convs.py: 0.635 -> 0.590 s).
        channels_last = x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
        y = torch.empty(n, self.out_channels, 2 * d, 2 * h, 2 * w, dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        k = 0
        for px in range(2):
            for py in range(2):
                for pz in range(2):
                    window = xp[:, :, px:px + d + 1, py:py + h + 1, pz:pz + w + 1]
                    y[:, :, px::2, py::2, pz::2] = F.conv3d(window, self.weight[k].to(x.dtype),
                                                             None if self.bias is None else self.bias.to(x.dtype))
                    k += 1
        return y


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
