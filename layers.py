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
        dims = [d for d in range(self.v.dim()) if d != self.out_dim]
        norm = torch.linalg.vector_norm(self.v, dim=dims, keepdim=True)
        shape = [1] * self.v.dim()
        shape[self.out_dim] = -1
        return self.g.view(shape) * self.v / norm

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
    def __init__(self, in_channels, out_channels, kernel_size, stride=1):
        super().__init__()
        self.stride = stride
        self._setup((out_channels, in_channels, *kernel_size), out_channels)

    def apply_weight(self, x, weight, bias):
        return F.conv2d(x, weight, bias, stride=self.stride)


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
        out = F.linear(x.movedim(1, -1), weight, bias)  # [B, H, W, C_out]
        return out.movedim(-1, 1)


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


class DownShiftedConv2d(nn.Module):
    """Conv whose output at (i, j) sees rows i-kh+1..i and columns j-(kw-1)/2..j+(kw-1)/2."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 3), stride=1):
        super().__init__()
        kh, kw = kernel_size
        self.pad = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)  # left, right, top, bottom
        self.conv = WNConv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class DownRightShiftedConv2d(nn.Module):
    """Conv whose output at (i, j) sees rows i-kh+1..i and columns j-kw+1..j."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 2), stride=1):
        super().__init__()
        kh, kw = kernel_size
        self.pad = (kw - 1, 0, kh - 1, 0)
        self.conv = WNConv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class DownShiftedDeconv2d(nn.Module):
    """Stride-2 transposed conv, cropped so that it stays down-shifted: [B,C,H,W] -> [B,C',2H,2W]."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 3)):
        super().__init__()
        self.kernel_size = kernel_size
        self.deconv = WNConvTranspose2d(in_channels, out_channels, kernel_size)

    def forward(self, x):
        kh, kw = self.kernel_size
        out = self.deconv(x)  # [B, C', 2H + kh - 1, 2W + kw - 1]
        return out[:, :, : out.shape[2] - kh + 1, (kw - 1) // 2 : out.shape[3] - (kw - 1) // 2]


class DownRightShiftedDeconv2d(nn.Module):
    """Stride-2 transposed conv, cropped so that it stays down-right-shifted."""

    def __init__(self, in_channels, out_channels, kernel_size=(2, 2)):
        super().__init__()
        self.kernel_size = kernel_size
        self.deconv = WNConvTranspose2d(in_channels, out_channels, kernel_size)

    def forward(self, x):
        kh, kw = self.kernel_size
        out = self.deconv(x)
        return out[:, :, : out.shape[2] - kh + 1, : out.shape[3] - kw + 1]


def concat_elu(x):
    """ELU of x and of -x, concatenated on channels: [B,C,H,W] -> [B,2C,H,W]."""
    return F.elu(torch.cat([x, -x], dim=1))


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
        self.dropout = nn.Dropout(dropout)
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

    def forward(self, x, skip=None, labels=None):
        h = self.conv_in(concat_elu(x))
        if self.skip is not None:
            h = h + self.skip(concat_elu(skip))
        h = self.dropout(concat_elu(h))
        h = self.conv_out(h)  # [B, 2C, H, W]
        h = self.condition(h, labels)
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)

    def condition(self, h, labels):
        if self.conditioning == "bias":
            return h + self.label_bias(labels)[:, :, None, None]
        if self.conditioning == "film":
            scale, shift = self.label_film(labels)[:, :, None, None].chunk(2, dim=1)
            return h * (1 + scale) + shift
        return h
