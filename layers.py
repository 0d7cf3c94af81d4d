"""Building blocks of PixelCNN++: weight-normalised layers, shifted convolutions, the gated resnet.

Shapes are [B, C, H, W] throughout. "Down-shifted" layers see only rows above the output row
(after the network's initial shift); "down-right-shifted" layers also see pixels to the left.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_CONDITIONING = ("none", "bias", "film")


class WeightNorm(nn.Module):
    """Mixin for a layer with weight g * v / ||v|| (norm over all dims but the output one).

    Setting `init_pending = True` makes the next forward pass a data-dependent initialisation
    (Salimans & Kingma, 2016): g and b are set so that the output has zero mean and unit
    variance per channel on that batch. See `data_dependent_init`.
    """

    out_dim = 0  # which dim of v indexes output channels

    def _setup(self, v_shape, out_channels):
        self.v = nn.Parameter(torch.randn(v_shape) * 0.05)
        self.g = nn.Parameter(torch.ones(out_channels))
        self.b = nn.Parameter(torch.zeros(out_channels))
        self.init_pending = False

    def weight(self):
        shape = [1] * self.v.dim()
        shape[self.out_dim] = -1
        # One fused op (and one in backward) where g * v / ||v|| would take four, each a pass.
        return torch._weight_norm(self.v, self.g.view(shape), self.out_dim)

    def forward(self, x):
        out = self.apply_weight(x, self.weight(), self.b)
        if self.init_pending:
            out = self._init_from(out)
        return out

    @torch.no_grad()
    def _init_from(self, out):
        """out: [B, C, H, W] computed with the current g, b -> rescaled output, with g, b updated."""
        self.init_pending = False
        mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3)) + 1e-8
        self.g.div_(std)
        self.b.sub_(mean).div_(std)
        return (out - mean[:, None, None]) / std[:, None, None]


class WNConv2d(WeightNorm):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self._setup((out_channels, in_channels, *kernel_size), out_channels)

    def apply_weight(self, x, weight, bias):
        return F.conv2d(x, weight, bias, stride=self.stride, padding=self.padding)


class WNConvTranspose2d(WeightNorm):
    out_dim = 1  # ConvTranspose2d weights are [in, out, kh, kw]

    def __init__(self, in_channels, out_channels, kernel_size, stride=2):
        super().__init__()
        self.stride = stride
        self._setup((in_channels, out_channels, *kernel_size), out_channels)

    def apply_weight(self, x, weight, bias):
        return F.conv_transpose2d(x, weight, bias, stride=self.stride, output_padding=self.stride - 1)


class NIN(WeightNorm):
    """A 1x1 convolution (a linear map over channels at every pixel)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self._setup((out_channels, in_channels), out_channels)

    def apply_weight(self, x, weight, bias):
        return F.conv2d(x, weight[:, :, None, None], bias)


def data_dependent_init(model, x, labels=None):
    """Initialise every weight-normalised layer of `model` from one batch, layer by layer."""
    for module in model.modules():
        if isinstance(module, WeightNorm):
            module.init_pending = True
    with torch.no_grad():
        model(x, labels)


def down_shift(x):
    """Shift rows down by one, filling the top row with zeros: output row i sees input row i-1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x):
    """Shift columns right by one, filling the left column with zeros."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class Crop(torch.autograd.Function):
    """x[:, :, :height, left:left + width], whose gradient keeps x's memory layout (autograd's own
    slice backward writes a [B, C, H, W]-contiguous gradient, which a channels-last convolution
    then converts back, in every layer) and is written in one pass (it zeroes the border only)."""

    @staticmethod
    def forward(ctx, x, height, left, width):
        ctx.shape, ctx.box, ctx.layout = x.shape, (height, left, width), memory_layout(x)
        return x[:, :, :height, left:left + width]

    @staticmethod
    def backward(ctx, grad):
        height, left, width = ctx.box
        full = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        full[:, :, :height, left:left + width] = grad
        full[:, :, height:] = 0  # zero only the cropped border, not the whole gradient first
        full[:, :, :height, :left] = 0
        full[:, :, :height, left + width:] = 0
        return full, None, None, None


def crop(x, height, left, width):
    """[B, C, H, W] -> the view [B, C, height, width] at row 0 and column `left`."""
    if needs_grad([x]) and not compiling():
        return Crop.apply(x, height, left, width)
    return x[:, :, :height, left:left + width]


class ShiftedConv2d(nn.Module):
    """A conv whose input is padded by `pad` = (left, right, top), with top and the sides at most
    one and left >= right: the conv pads top and left on both sides itself, and the extra output
    row (and column) at the bottom (and right) is cropped, which costs a few percent more
    multiplies but saves writing a padded copy of the input (and reading one back in backward)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, pad):
        super().__init__()
        left, right, top = pad
        assert left >= right, "the crop keeps the output's first columns"
        self.pad = pad
        self.conv = WNConv2d(in_channels, out_channels, kernel_size, stride, padding=(top, left))

    def forward(self, x):
        out = self.conv(x)  # [B, C', H', W']: an extra row (and column) where it padded both sides
        H, W = [(n + self.conv.stride - 1) // self.conv.stride for n in x.shape[2:]]
        return crop(out, H, 0, W)


class DownShiftedConv2d(ShiftedConv2d):
    """Conv whose output at (i, j) sees rows i-kh+1..i and columns j-(kw-1)/2..j+(kw-1)/2."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 3), stride=1):
        kh, kw = kernel_size
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         ((kw - 1) // 2, (kw - 1) // 2, kh - 1))


class DownRightShiftedConv2d(ShiftedConv2d):
    """Conv whose output at (i, j) sees rows i-kh+1..i and columns j-kw+1..j."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 2), stride=1):
        kh, kw = kernel_size
        super().__init__(in_channels, out_channels, kernel_size, stride, (kw - 1, 0, kh - 1))


class DownShiftedDeconv2d(nn.Module):
    """Stride-2 transposed conv, cropped so that it stays down-shifted: [B,C,H,W] -> [B,C',2H,2W]."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 3)):
        super().__init__()
        self.kernel_size = kernel_size
        self.deconv = WNConvTranspose2d(in_channels, out_channels, kernel_size)

    def forward(self, x):
        kh, kw = self.kernel_size
        out = self.deconv(x)  # [B, C', 2H + kh - 1, 2W + kw - 1]
        return crop(out, out.shape[2] - kh + 1, (kw - 1) // 2, out.shape[3] - kw + 1)


class DownRightShiftedDeconv2d(nn.Module):
    """Stride-2 transposed conv, cropped so that it stays down-right-shifted."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 2)):
        super().__init__()
        self.kernel_size = kernel_size
        self.deconv = WNConvTranspose2d(in_channels, out_channels, kernel_size)

    def forward(self, x):
        kh, kw = self.kernel_size
        out = self.deconv(x)
        return crop(out, out.shape[2] - kh + 1, 0, out.shape[3] - kw + 1)


def dropout(x, p, training):
    """Elementwise dropout with the statistics of F.dropout, at a sixth of its cost on a CPU.

    F.dropout draws one random number per element (bernoulli_, a fifth of a CPU training step);
    here each 64-bit draw of the global generator gives eight 8-bit uniforms where p is a multiple
    of 1/256 (0.5 is), else four 16-bit ones, and an element is dropped when its uniform falls
    below p (p rounded to a multiple of 2^-16; kept ones are scaled by 1 / (1 - that p)).
    """
    if not training or p == 0:
        return x
    if compiling():
        return F.dropout(x, p, training)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    # The random draws are half the cost at 8 bits.
    bits, signed = (8, torch.int8) if (p * 2 ** 8).is_integer() else (16, torch.int16)
    per_word, n = 64 // bits, x.numel()
    words = torch.empty((n + per_word - 1) // per_word, dtype=torch.int64, device=x.device)
    words.random_(-2 ** 63, None)
    uniforms = words.view(signed)[:n].as_strided(x.shape, x.stride())  # x's memory layout
    dropped = round(p * 2 ** bits)
    # As uint8: bool converts to a float dtype at half the speed.
    kept = (uniforms >= dropped - 2 ** (bits - 1)).view(torch.uint8)
    mask = kept.to(x.dtype).mul_(2 ** bits / (2 ** bits - dropped))
    return x * mask


def elu_slope(out, grad):
    """grad times d elu(y) / dy, from the output alone: min(elu(y), 0) + 1. ATen's elu_backward
    computes exactly this in one pass (is_result=True), where clamp, add and mul would take three."""
    return torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, True, out)


def elu_forward(x):
    """F.elu(x) without expm1, which PyTorch does not vectorise on CPUs: with c = exp(-|x|) - 1,
    elu(x) = max(x, c), since exp(y) - 1 >= y."""
    return torch.maximum(x, x.abs().neg_().exp_().sub_(1))


def concat_elu_forward(xs):
    """[elu(x), elu(-x)] for x the channel concatenation of xs, written straight into one output:
    no concatenated copies (a channel-wise cat is slow in channels-last memory), and one exp for
    both halves, as elu(x) = max(x, c) and elu(-x) = max(-x, c) with c = exp(-|x|) - 1."""
    B, _, H, W = xs[0].shape
    C = sum(x.shape[1] for x in xs)
    layout = memory_layout(xs[0])
    out = torch.empty(B, 2 * C, H, W, dtype=xs[0].dtype, device=xs[0].device, memory_format=layout)
    # Work on views in memory order, so that every temporary takes the layout of its input.
    order = memory_order(layout)
    out_view, channel_dim = out.permute(order), order.index(1)
    start = 0
    for x in xs:
        x = x.permute(order)
        curved = x.abs().neg_().exp_().sub_(1)
        torch.maximum(x, curved, out=out_view.narrow(channel_dim, start, x.shape[channel_dim]))
        torch.maximum(x.neg(), curved, out=out_view.narrow(channel_dim, C + start, x.shape[channel_dim]))
        start += x.shape[channel_dim]
    return out


def memory_layout(x):
    """torch.channels_last where x [B, C, H, W] keeps its channels adjacent in memory (a cropped
    view included), else torch.contiguous_format."""
    channels_adjacent = x.stride(1) == 1 and x.shape[1] > 1
    return torch.channels_last if channels_adjacent else torch.contiguous_format


def memory_order(layout):
    """The dims of a [B, C, H, W] tensor in `layout`, outermost first."""
    return (0, 2, 3, 1) if layout == torch.channels_last else (0, 1, 2, 3)


class Elu(torch.autograd.Function):
    """elu_forward with a backward pass that needs only the output (see elu_slope)."""

    @staticmethod
    def forward(ctx, x):
        out = elu_forward(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return elu_slope(out, grad)


class ConcatElu(torch.autograd.Function):
    """concat_elu_forward with a backward pass that needs only the output (see elu_slope)."""

    @staticmethod
    def forward(ctx, *xs):
        out = concat_elu_forward(xs)
        ctx.save_for_backward(out)
        ctx.channels = [x.shape[1] for x in xs]
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        slope = elu_slope(out, grad)
        C = out.shape[1] // 2
        grads, start = [], 0
        for channels in ctx.channels:
            grads.append(slope[:, start:start + channels] - slope[:, C + start:C + start + channels])
            start += channels
        return tuple(grads)


def needs_grad(xs):
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def compiling():
    """True while torch.compile traces the model. It then gets the plain formulation of each
    hand-written op here: the compiler fuses those itself, and the hand-written ones' writes
    into views (out=) and autograd.Functions would break its graph into pieces."""
    return torch.compiler.is_compiling()


def elu(x):
    """F.elu(x), faster on CPUs (see elu_forward). Without gradients (sampling, scoring) it skips
    the autograd.Function, whose overhead dominates on the sampler's few pixels."""
    if compiling():
        return F.elu(x)
    return Elu.apply(x) if needs_grad([x]) else elu_forward(x)


def concat_elu(*xs):
    """ELU of x and of -x, concatenated on channels, for x the channel concatenation of xs:
    [B,C,H,W] -> [B,2C,H,W]. concat_elu(a, b) equals concat_elu(torch.cat([a, b], dim=1))."""
    if compiling():
        x = torch.cat(xs, dim=1)
        return F.elu(torch.cat([x, -x], dim=1))
    return ConcatElu.apply(*xs) if needs_grad(xs) else concat_elu_forward(xs)


def gate_forward(x, h):
    """x + a * sigmoid(b) for [a, b] = h [B, 2C, H, W] split on channels -> (output, sigmoid(b))."""
    a, b = h.chunk(2, dim=1)
    # sigmoid of a channel slice of a channels-last tensor runs 3-7x slower than of a dense copy
    # (PyTorch 2.14 on CPUs, worst in bf16), so it works on one.
    s = torch.sigmoid(b.contiguous(memory_format=memory_layout(h)))
    return torch.addcmul(x, a, s), s


class Gate(torch.autograd.Function):
    """gate_forward with a backward pass written straight into h's gradient, in h's layout: half
    the passes of autograd's (addcmul's backward multiplies by its scale too, and chunk's backward
    zero-fills before it copies)."""

    @staticmethod
    def forward(ctx, x, h):
        out, s = gate_forward(x, h)
        ctx.save_for_backward(h, s)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, s = ctx.saved_tensors
        a = h.chunk(2, dim=1)[0]
        grad_h = torch.empty_like(h)  # h's layout
        grad_a, grad_b = grad_h.chunk(2, dim=1)
        torch.mul(grad, s, out=grad_a)
        grad_b.copy_(torch.ops.aten.sigmoid_backward(grad * a, s))  # grad * a * s * (1 - s)
        return grad, grad_h


def gate(x, h):
    """x + a * sigmoid(b), where [a, b] = h split on channels.
    x [B, C, H, W], h [B, 2C, H, W] -> [B, C, H, W]."""
    if compiling():
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)
    return Gate.apply(x, h) if needs_grad([x, h]) else gate_forward(x, h)[0]


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), where [a, b] = conv(concat_elu(conv(concat_elu(x)) + nin(concat_elu(skip)))).

    `conditioning` decides how a label enters the gate pre-activation [a, b]:
    'bias' adds a learned per-label vector, 'film' scales and shifts it per label.
    """

    def __init__(self, channels, conv_class, skip_channels=0, dropout=0.0,
                 num_classes=0, conditioning="none"):
        super().__init__()
        self.conv_in = conv_class(2 * channels, channels)
        self.skip = NIN(2 * skip_channels, channels) if skip_channels else None
        self.dropout_p = dropout
        self.conv_out = conv_class(2 * channels, 2 * channels)
        # Label parameters start at zero, so that every label starts with the same likelihood
        # (see PixelCNNpp): random ones make log p(x|c) differ by hundreds of nats at step 0.
        self.conditioning = conditioning if num_classes else "none"
        if self.conditioning == "bias":
            self.label_bias = nn.Embedding(num_classes, 2 * channels)
            nn.init.zeros_(self.label_bias.weight)
        elif self.conditioning == "film":
            # Per label: a scale offset (the scale is 1 + offset) and a shift, for 2*channels.
            self.label_film = nn.Embedding(num_classes, 4 * channels)
            nn.init.zeros_(self.label_film.weight)

    def forward(self, x, *skips, labels=None):
        """skips: the skip input, or its parts (taken as their concatenation on channels)."""
        h = self.conv_in(concat_elu(x))
        if self.skip is not None:
            h = h + self.skip(concat_elu(*skips))
        h = dropout(concat_elu(h), self.dropout_p, self.training)
        h = self.conv_out(h)  # [B, 2C, H, W]
        h = self.condition(h, labels)
        return gate(x, h)

    def condition(self, h, labels):
        # The label vectors take h's dtype: under bf16 autocast a float32 one would turn every
        # later activation into float32 (type promotion), and mixed-dtype passes are slow.
        if self.conditioning == "bias":
            return h + self.label_bias(labels).to(h.dtype)[:, :, None, None]
        if self.conditioning == "film":
            scale, shift = self.label_film(labels).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            return torch.addcmul(shift, h, 1 + scale)  # h * (1 + scale) + shift
        return h
