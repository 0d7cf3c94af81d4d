"""The conditional PixelCNN++ network (Salimans et al., 2017), built from a plain config dict.

model(x, labels): x in [-1, 1], [B, 3, H, W]; labels [B] (None when num_classes is 0)
                  -> mixture parameters [B, 10 * nr_logistic_mix, H, W].
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from layers import (BLOCK_CONDITIONING, NIN, DownRightShiftedConv2d, DownRightShiftedDeconv2d,
                    DownShiftedConv2d, DownShiftedDeconv2d, GatedResnet, compiling, down_shift, elu,
                    memory_layout, right_shift)


@dataclass(frozen=True)
class Key:
    """A config key: values are checked against its type and its interval or choices."""
    name: str
    type: type            # int, float, bool or str
    default: object
    help: str
    interval: str = ""    # for numbers: "[1, inf)", "(0, 1]", ...
    choices: tuple = ()
    nullable: bool = False

    def check(self, value):
        """-> value in the key's type (YAML reads 1e-3 as a string, and 3.0 is an int here);
        ValueError naming the key when it does not fit."""
        if value is None:
            if self.nullable:
                return None
            raise ValueError(f"config key {self.name!r} cannot be null")
        if isinstance(value, str) and self.type in (int, float):
            try:
                value = self.type(value)
            except ValueError:
                pass
        if self.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) != (self.type is bool) or not isinstance(value, self.type):
            what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.type]
            raise ValueError(f"config key {self.name!r} must be {what}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"config key {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        if self.interval and not in_interval(value, self.interval):
            raise ValueError(f"config key {self.name!r} must be in {self.interval}"
                             f"{' or null' if self.nullable else ''}, got {value!r}")
        return value


def in_interval(value, interval):
    """Whether `value` lies in an interval written like "[0, 1)" or "(0, inf)"."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = low <= value if interval[0] == "[" else low < value
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


MODEL_KEYS = (
    Key("nr_resnet", int, 5, "gated resnets per stream per resolution", "[1, inf)"),
    Key("nr_filters", int, 160, "channels of every layer", "[1, inf)"),
    Key("nr_logistic_mix", int, 10, "logistic components per pixel", "[1, inf)"),
    Key("dropout", float, 0.5, "dropout in every gated resnet", "[0, 1)"),
    Key("num_classes", int, 4, "labels 0..num_classes-1; 0 for an unconditional model", "[0, inf)"),
    Key("embedding_dim", int, 32, "label embedding concatenated to the input (0: none)", "[0, inf)"),
    Key("block_conditioning", str, "none", "label conditioning inside every gated resnet",
        choices=BLOCK_CONDITIONING),
    Key("image_size", int, 32, "images are image_size x image_size, a multiple of 4", "[4, inf)"),
)
MODEL_DEFAULTS = {key.name: key.default for key in MODEL_KEYS}
NUM_RESOLUTIONS = 3  # 32, 16, 8 for a 32x32 input


def validate_model_config(config):
    """Fill in defaults and check every key and value; ValueError names the key and what is allowed."""
    unknown = sorted(set(config) - set(MODEL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model config key {unknown[0]!r}; allowed: {sorted(MODEL_DEFAULTS)}")
    config = {**MODEL_DEFAULTS, **config}
    config = {key.name: key.check(config[key.name]) for key in MODEL_KEYS}
    if config["image_size"] % 4:
        raise ValueError(f"config key 'image_size' must be a multiple of 4, got {config['image_size']}")
    return config


class PixelCNNpp(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = validate_model_config(config)
        c = self.config
        nf, nr = c["nr_filters"], c["nr_resnet"]
        self.num_classes = c["num_classes"]
        # Every label parameter starts at zero: all labels start with the same likelihood. Random
        # ones would sum over 3072 dimensions into log p(x|c) that differ by hundreds of nats,
        # and the hybrid objective's cross-entropy would then wreck the likelihood in its first
        # steps. Gradients still reach them (through nonzero weights), so they learn at once.
        self.label_embedding = (nn.Embedding(c["num_classes"], c["embedding_dim"])
                                if c["num_classes"] and c["embedding_dim"] else None)
        if self.label_embedding is not None:
            nn.init.zeros_(self.label_embedding.weight)
        in_channels = 3 + 1 + (c["embedding_dim"] if self.label_embedding is not None else 0)

        def resnet(conv_class, skip_channels=0):
            return GatedResnet(nf, conv_class, skip_channels, c["dropout"],
                               c["num_classes"], c["block_conditioning"])

        def stack(conv_class, n, skip_channels):
            return nn.ModuleList(resnet(conv_class, skip_channels) for _ in range(n))

        # First layers: u sees the rows above; ul sees the rows above and the pixels to the left.
        self.u_init = DownShiftedConv2d(in_channels, nf, (2, 3))
        self.ul_init_up = DownShiftedConv2d(in_channels, nf, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(in_channels, nf, (2, 1))

        down_counts = [nr] + [nr + 1] * (NUM_RESOLUTIONS - 1)
        self.up_u = nn.ModuleList(stack(DownShiftedConv2d, nr, 0) for _ in range(NUM_RESOLUTIONS))
        self.up_ul = nn.ModuleList(stack(DownRightShiftedConv2d, nr, nf) for _ in range(NUM_RESOLUTIONS))
        self.down_u = nn.ModuleList(stack(DownShiftedConv2d, n, nf) for n in down_counts)
        self.down_ul = nn.ModuleList(stack(DownRightShiftedConv2d, n, 2 * nf) for n in down_counts)

        n_scale = NUM_RESOLUTIONS - 1
        self.downsize_u = nn.ModuleList(DownShiftedConv2d(nf, nf, (2, 3), stride=2) for _ in range(n_scale))
        self.downsize_ul = nn.ModuleList(DownRightShiftedConv2d(nf, nf, (2, 2), stride=2) for _ in range(n_scale))
        self.upsize_u = nn.ModuleList(DownShiftedDeconv2d(nf, nf, (2, 3)) for _ in range(n_scale))
        self.upsize_ul = nn.ModuleList(DownRightShiftedDeconv2d(nf, nf, (2, 2)) for _ in range(n_scale))

        self.out = NIN(nf, 10 * c["nr_logistic_mix"])

    def check_inputs(self, x, labels):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"input x must have shape [B, 3, H, W] (3 channels, RGB), got {list(x.shape)}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"input height and width must be multiples of 4, got {list(x.shape[2:])}")
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("labels were given to an unconditional model (num_classes 0); pass None")
            return
        if labels is None:
            raise ValueError(f"labels are required: the model has num_classes {self.num_classes}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape [B] = [{x.shape[0]}], got {list(labels.shape)}")
        # The values are data, which a compiled graph cannot branch on: the data sets' CSVs were checked.
        if not compiling() and labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1} (num_classes), "
                             f"got values in {labels.min().item()}..{labels.max().item()}")

    def embed_input(self, x, labels):
        """[B,3,H,W] -> [B, 4 + embedding_dim, H, W]: a ones channel (padding differs from black)
        and the label embedding broadcast over every pixel."""
        parts = [x, torch.ones_like(x[:, :1])]
        if self.label_embedding is not None:
            emb = self.label_embedding(labels).to(x.dtype)  # [B, E]
            parts.append(emb[:, :, None, None].expand(-1, -1, *x.shape[2:]))
        return torch.cat(parts, dim=1).contiguous(memory_format=memory_layout(x))  # x's layout

    def forward(self, x, labels=None):
        self.check_inputs(x, labels)
        h = self.embed_input(x, labels)

        # Up pass: keep every activation for the skips.
        u_list = [down_shift(self.u_init(h))]
        ul_list = [down_shift(self.ul_init_up(h)) + right_shift(self.ul_init_left(h))]
        for level in range(NUM_RESOLUTIONS):
            for u_block, ul_block in zip(self.up_u[level], self.up_ul[level]):
                u_list.append(u_block(u_list[-1], labels=labels))
                ul_list.append(ul_block(ul_list[-1], u_list[-1], labels=labels))
            if level < NUM_RESOLUTIONS - 1:
                u_list.append(self.downsize_u[level](u_list[-1]))    # [B, F, H/2, W/2]
                ul_list.append(self.downsize_ul[level](ul_list[-1]))

        # Down pass: consume the skips in reverse.
        u, ul = u_list.pop(), ul_list.pop()
        for level in range(NUM_RESOLUTIONS):
            for u_block, ul_block in zip(self.down_u[level], self.down_ul[level]):
                u = u_block(u, u_list.pop(), labels=labels)
                ul = ul_block(ul, u, ul_list.pop(), labels=labels)  # skip: [u, ul from the up pass]
            if level < NUM_RESOLUTIONS - 1:
                u = self.upsize_u[level](u)      # [B, F, 2H, 2W]
                ul = self.upsize_ul[level](ul)
        assert not u_list and not ul_list, "every up-pass activation feeds exactly one skip"

        return self.out(elu(ul)).contiguous()  # [B, 10 * M, H, W], the loss's layout in any case


def build_model(config):
    """The PixelCNN++ described by `config` (model keys only; see MODEL_DEFAULTS)."""
    return PixelCNNpp(config)
