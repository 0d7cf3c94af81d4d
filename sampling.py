"""The samplers of PixelCNN++: the naive one and the cached incremental one, side by side, and
generate(), which draws uint8 images with either.

Both sample pixel by pixel in raster order, one random draw per pixel, in one loop
(sample_raster); they differ only in how they get each pixel's mixture parameters:
- naive (FullForward): one full forward pass of the network per pixel, the reference;
- cached (IncrementalPixelCNN, after Ramachandran et al., 2017, "Fast Generation for
  Convolutional Autoregressive Models"): only the activations that the new pixel makes
  computable, exactly equal to the full forward pass, at a constant cost per pixel.
So both give the same images from the same generator (in float64 to the bit).

The cache: every activation of the network gets a buffer of its full size, plus one row of zero
padding on top and one column on each side (the padding the shifted convolutions would add). When
the sampler reaches pixel (i, j), only the values that just became computable are computed, each
from windows of buffers that already hold everything it needs:
- the u stream (down-shifted: it sees only rows above) a whole row at a time, at the start of
  image row i: row i at full resolution, row i/2 at half resolution when i is even, row i/4 at
  quarter resolution when i is a multiple of 4 (so strided layers run on every other row);
- the ul stream (down-right-shifted: it also sees pixels to the left) one position at a time:
  (i, j) at full resolution, (i/2, j/2) at half resolution when i and j are even, and so on.
Each step costs the same whatever the row, and no value is computed twice.

Completion starts below given rows: take_rows computes all that those rows make computable in one
pass per layer over all of them (a few big convolutions instead of one small one per pixel), so
completing the bottom half costs about half of a whole sample.
"""
import numpy as np
import torch
import torch.nn.functional as F

from layers import WeightNorm
from model import NUM_RESOLUTIONS
from utils import in_eval_mode, sample_from_discretized_mix_logistic, sample_guided_pixel


def generate(model, labels, sampler="fast", seed=0, n=None, progress=None, given=None, keep_rows=0,
             guidance=0.0):
    """Sample uint8 images [B, 3, H, W] (H = W = model.config['image_size']) with the model's own
    dtype and device. labels: LongTensor [B], or None for an unconditional model (then give n).
    The generator is torch.Generator(device).manual_seed(seed); `sampler` is 'fast' (the cached
    sampler) or 'naive'. progress: a tqdm-like object updated once per sampled pixel, or None.
    given: uint8 images [B, 3, H, W] whose top `keep_rows` rows are kept as they are (completion):
    only the rows below are sampled, and they come back in the result unchanged. guidance w > 0
    draws each pixel from its label's mixture sharpened against the other labels'
    (sample_guided_pixel; the network runs under every label, K times the work)."""
    samplers = {"fast": generate_cached, "naive": generate_naive}
    if sampler not in samplers:
        raise ValueError(f"sampler must be 'fast' or 'naive', got {sampler!r}")
    param = next(model.parameters())
    generator = torch.Generator(param.device).manual_seed(seed)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=param.device)
    start = None if given is None else given.to(param.device, param.dtype) / 127.5 - 1  # the 256 levels
    return to_uint8(samplers[sampler](model, labels, generator, progress, n, start, keep_rows, guidance))


def to_uint8(x):
    """Images in [-1, 1] on the 256 levels -> uint8: round((x + 1) * 127.5)."""
    return torch.round((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def derive_seed(seed, class_index, chunk):
    """The generator seed of batch `chunk` of class `class_index` (-1: unconditional). It depends
    on these three alone, so a class's images do not depend on which other classes are drawn."""
    return int(np.random.SeedSequence([seed, class_index + 1, chunk]).generate_state(1)[0])


@in_eval_mode
def generate_naive(model, labels, generator, progress=None, n=None, start=None, keep_rows=0,
                   guidance=0.0):
    """The reference sampler, one full forward pass per pixel: float images in [-1, 1] on the 256
    levels, [B, 3, H, W], in the model's dtype. labels: [B], or None (then n images from the
    unconditional model). progress: a tqdm-like object updated once per pixel, or None.
    start: images [B, 3, H, W] in [-1, 1] whose top keep_rows rows are kept; the rest is sampled.
    guidance: the weight w of sample_guided_pixel (0: the model's own p(x|c))."""
    return sample_raster(FullForward, model, labels, generator, progress, n, start, keep_rows, guidance)


@in_eval_mode
def generate_cached(model, labels, generator, progress=None, n=None, start=None, keep_rows=0,
                    guidance=0.0):
    """The cached sampler: the same images as generate_naive (same arguments, same result), with
    the work of one pixel constant instead of a full forward pass."""
    return sample_raster(IncrementalPixelCNN, model, labels, generator, progress, n, start, keep_rows,
                         guidance)


@torch.inference_mode()
def sample_raster(network, model, labels, generator, progress, n, start=None, keep_rows=0, guidance=0.0):
    """Sample a batch pixel by pixel in raster order, one random draw per pixel, with
    `network` (FullForward or IncrementalPixelCNN) giving each pixel's mixture parameters. The
    top keep_rows rows come from `start` and draw no noise: sampling begins at row keep_rows.
    With guidance > 0 the network runs on every image under every label (image-major: row
    b * K + k carries label k) and sample_guided_pixel draws each pixel (one [B, 3] uniform draw).
    The model must be in eval mode (generate_naive and generate_cached see to it)."""
    if model.training:
        raise ValueError("sample_raster needs the model in eval mode: dropout would change every draw")
    param = next(model.parameters())
    batch_size = labels.shape[0] if labels is not None else n
    if batch_size is None:
        raise ValueError("an unconditional batch needs n (the number of images)")
    K = model.config["num_classes"]
    if guidance and (labels is None or K < 2):
        raise ValueError("guidance needs a conditional model with at least two labels, and labels")
    copies = K if guidance else 1  # rows of the network per image
    if guidance:
        labels_of_rows = torch.arange(K, device=param.device).repeat(batch_size)  # [B * K]
    else:
        labels_of_rows = labels
    net = network(model, labels_of_rows, batch_size * copies, param.device, param.dtype)
    size = model.config["image_size"]
    images = torch.zeros(batch_size, 3, size, size, device=param.device, dtype=param.dtype)
    if keep_rows:
        if start is None or start.shape != images.shape or not 0 < keep_rows <= size:
            raise ValueError(f"keep_rows {keep_rows} needs start images of shape {list(images.shape)} "
                             f"and 1 <= keep_rows <= {size}")
        images[:, :, :keep_rows] = start[:, :, :keep_rows]
        net.take_rows(images.repeat_interleave(copies, dim=0), keep_rows)
    for i in range(keep_rows, size):
        net.start_row(i)
        for j in range(size):
            params = net.params_at(i, j)  # [B * copies, 10M, 1, 1]
            if guidance:
                pixel, _ = sample_guided_pixel(params.view(batch_size, K, -1), labels, guidance, generator)
                pixel = pixel[:, :, None, None]  # [B, 3, 1, 1]
            else:
                pixel = sample_from_discretized_mix_logistic(params, generator)  # [B, 3, 1, 1]
            net.set_pixel(i, j, pixel.repeat_interleave(copies, dim=0))
            images[:, :, i:i + 1, j:j + 1] = pixel
            if progress is not None:
                progress.update(1)
    return images


class FullForward:
    """The naive sampler's network: the whole model on the image drawn so far, for every pixel.
    The same interface as IncrementalPixelCNN (take_rows, start_row, params_at, set_pixel)."""

    def __init__(self, model, labels, batch_size, device, dtype):
        self.model, self.labels = model, labels
        size = model.config["image_size"]
        self.x = torch.zeros(batch_size, 3, size, size, device=device, dtype=dtype)

    def take_rows(self, x, rows):
        self.x[:, :, :rows] = x[:, :, :rows]

    def start_row(self, i):
        pass  # nothing is kept between pixels

    def params_at(self, i, j):
        return self.model(self.x, self.labels)[:, :, i:i + 1, j:j + 1]  # [B, 10M, 1, 1]

    def set_pixel(self, i, j, value):
        self.x[:, :, i:i + 1, j:j + 1] = value


# ---------------------------------------------------------------------------------------------
# The cache.

def concat_elu_few_pixels(*xs):
    """layers.concat_elu in the fewest operations: on the sampler's few pixels, per-operation
    overhead outweighs the memory passes that layers.concat_elu saves on whole images."""
    return F.elu(torch.cat([*xs, *(-x for x in xs)], dim=1))


class IncrementalPixelCNN:
    """The activations of `model` for a batch being generated pixel by pixel.

    Use: for each row i, call `start_row(i)`; then for each column j, `params_at(i, j)` gives
    the mixture parameters [B, 10M, 1, 1] for pixel (i, j), and `set_pixel(i, j, value)` writes
    its sampled (or given) value [B, 3, 1, 1]. Pixels must come in raster order. To start below
    given rows, call `take_rows(x, rows)` first, then go on from row `rows`.
    """

    def __init__(self, model, labels, batch_size, device, dtype):
        self.model, self.labels = model, labels
        self.B, self.device, self.dtype = batch_size, device, dtype
        self.size = model.config["image_size"]
        self.buffers = {}
        self.weights = {m: m.weight() for m in model.modules() if isinstance(m, WeightNorm)}
        self.u_skips, self.ul_skips = self._skip_names()
        self.output = f"down_ul0.{len(model.down_ul[-1]) - 1}"  # the last activation, before the NIN

        # The input buffer: pixel values (filled as they are sampled), ones, label embedding.
        zeros = torch.zeros(batch_size, 3, self.size, self.size, device=device, dtype=dtype)
        self.write("input", 0, (0, self.size, 0, self.size), model.embed_input(zeros, labels))

    # --- buffers -----------------------------------------------------------------------------
    def buffer(self, name, level, channels):
        if name not in self.buffers:
            side = self.size >> level
            self.buffers[name] = torch.zeros(self.B, channels, side + 1, side + 2,
                                             device=self.device, dtype=self.dtype)
        return self.buffers[name]

    def write(self, name, level, region, value):
        r0, r1, c0, c1 = region
        self.buffer(name, level, value.shape[1])[:, :, r0 + 1:r1 + 1, c0 + 1:c1 + 1] = value

    def read(self, name, region):
        r0, r1, c0, c1 = region
        return self.buffers[name][:, :, r0 + 1:r1 + 1, c0 + 1:c1 + 1]

    # --- layers on a region --------------------------------------------------------------------
    def conv(self, shifted_conv, source, region, pre=None):
        """A down-shifted or down-right-shifted conv's output on `region` of its output grid."""
        pad_left, _, pad_top = shifted_conv.pad
        wn = shifted_conv.conv
        kh, kw, s = wn.v.shape[2], wn.v.shape[3], wn.stride
        r0, r1, c0, c1 = region
        window = self.buffers[source][:, :, s * r0 - pad_top + 1: s * (r1 - 1) - pad_top + 1 + kh,
                                      s * c0 - pad_left + 1: s * (c1 - 1) - pad_left + 1 + kw]
        if pre is not None:
            window = pre(window)
        return F.conv2d(window, self.weights[wn], wn.b, stride=s)

    def shifted_conv(self, shifted_conv, source, region, down=0, right=0):
        """down_shift (down=1) or right_shift (right=1) of a conv's output, on `region`: the output
        `down` rows above and `right` columns left, zero where that falls outside the image."""
        r0, r1, c0, c1 = region
        top, left = max(r0, down), max(c0, right)  # the part of the region that the output reaches
        if top >= r1 or left >= c1:
            return torch.zeros(self.B, shifted_conv.conv.v.shape[0], r1 - r0, c1 - c0,
                               device=self.device, dtype=self.dtype)
        out = self.conv(shifted_conv, source, (top - down, r1 - down, left - right, c1 - right))
        return F.pad(out, (left - c0, 0, top - r0, 0))  # no-op inside the image

    def nin(self, layer, x):
        # A matrix product: on a few pixels it costs less than NIN's 1x1 convolution.
        return F.linear(x.movedim(1, -1), self.weights[layer], layer.b).movedim(-1, 1)

    def resnet(self, block, name, source, skip_sources, level, region):
        """A gated resnet block on `region`: reads `source` and the skips, writes `name`."""
        mid = self.conv(block.conv_in, source, region, pre=concat_elu_few_pixels)
        if block.skip is not None:
            skip = [self.read(s, region) for s in skip_sources]
            mid = mid + self.nin(block.skip, concat_elu_few_pixels(*skip))
        self.write(name + "/mid", level, region, mid)
        gate = self.conv(block.conv_out, name + "/mid", region, pre=concat_elu_few_pixels)
        gate = block.condition(gate, self.labels)
        a, b = gate.chunk(2, dim=1)
        self.write(name, level, region, torch.addcmul(self.read(source, region), a, torch.sigmoid(b)))

    def _skip_names(self):
        """For each down-pass block, the up-pass activation it takes as a skip (as in forward)."""
        nr = self.model.config["nr_resnet"]
        u_list, ul_list = ["u_init"], ["ul_init"]
        for level in range(NUM_RESOLUTIONS):
            u_list += [f"up_u{level}.{k}" for k in range(nr)]
            ul_list += [f"up_ul{level}.{k}" for k in range(nr)]
            if level < NUM_RESOLUTIONS - 1:
                u_list.append(f"downsize_u{level}")
                ul_list.append(f"downsize_ul{level}")
        u_skips, ul_skips = {"start": u_list.pop()}, {"start": ul_list.pop()}
        for level, blocks in enumerate(self.model.down_u):
            for k in range(len(blocks)):
                u_skips[level, k], ul_skips[level, k] = u_list.pop(), ul_list.pop()
        return u_skips, ul_skips

    # --- the two streams -------------------------------------------------------------------------
    def take_rows(self, x, rows):
        """Take the top `rows` rows of x [B, 3, H, W] as given: write them into the input, then
        compute everything they make computable, each layer on all of those rows at once (as
        start_row and params_at would over those rows, one row and one pixel at a time)."""
        self.buffers["input"][:, :3, 1:rows + 1, 1:self.size + 1] = x[:, :, :rows]
        # At level L (side W / 2^L), row r is computed at image row r * 2^L: rows < ceil(rows / 2^L).
        done = {level: -(-rows // (1 << level)) for level in range(NUM_RESOLUTIONS)}
        self.u_stream({level: (0, r) for level, r in done.items()})
        self.ul_stream({level: (0, r, 0, self.size >> level) for level, r in done.items()})

    def start_row(self, i):
        """Compute every u-stream row that image row i needs (all of them depend on rows < i)."""
        self.u_stream({level: (i >> level, (i >> level) + 1)
                       for level in range(NUM_RESOLUTIONS) if i % (1 << level) == 0})

    def params_at(self, i, j):
        """Mixture parameters for pixel (i, j), [B, 10M, 1, 1]; call after start_row(i)."""
        self.ul_stream({level: (i >> level, (i >> level) + 1, j >> level, (j >> level) + 1)
                        for level in range(NUM_RESOLUTIONS)
                        if i % (1 << level) == 0 and j % (1 << level) == 0})
        return self.nin(self.model.out, F.elu(self.read(self.output, (i, i + 1, j, j + 1))))

    def set_pixel(self, i, j, value):
        """Write pixel (i, j)'s RGB value [B, 3, 1, 1] into the input."""
        self.buffers["input"][:, :3, i + 1, j + 1] = value[:, :, 0, 0]

    def u_stream(self, rows):
        """The u stream (it sees only rows above) on whole rows: rows[level] = (r0, r1) for each
        level that has new rows; the rows above them must be computed already."""
        m = self.model
        for level in range(NUM_RESOLUTIONS):  # up pass
            previous = f"downsize_u{level - 1}" if level > 0 else "u_init"
            if level not in rows:
                continue
            region = (*rows[level], 0, self.size >> level)
            if level == 0:  # u_init = down_shift(conv(input))
                self.write("u_init", 0, region, self.shifted_conv(m.u_init, "input", region, down=1))
            else:
                last = f"up_u{level - 1}.{len(m.up_u[level - 1]) - 1}"
                self.write(previous, level, region, self.conv(m.downsize_u[level - 1], last, region))
            for k, block in enumerate(m.up_u[level]):
                self.resnet(block, f"up_u{level}.{k}", previous, [], level, region)
                previous = f"up_u{level}.{k}"

        for level in reversed(range(NUM_RESOLUTIONS)):  # down pass, coarsest first
            down = NUM_RESOLUTIONS - 1 - level  # index into the model's down-pass lists
            previous = self.u_skips["start"] if down == 0 else f"upsize_u{level + 1}"
            if level not in rows:
                continue
            region = (*rows[level], 0, self.size >> level)
            for k, block in enumerate(m.down_u[down]):
                self.resnet(block, f"down_u{level}.{k}", previous, [self.u_skips[down, k]], level, region)
                previous = f"down_u{level}.{k}"
            if level > 0:  # row r feeds rows 2r and 2r + 1 of the finer grid
                up = m.upsize_u[down](self.read(previous, region))
                self.write(f"upsize_u{level}", level - 1, tuple(2 * x for x in region), up)

    def ul_stream(self, regions):
        """The ul stream (it also sees pixels to the left) on regions[level] = (r0, r1, c0, c1) for
        each level that has new positions; those above and to the left must be computed already."""
        m = self.model
        for level in range(NUM_RESOLUTIONS):  # up pass
            previous = f"downsize_ul{level - 1}" if level > 0 else "ul_init"
            if level not in regions:
                continue
            region = regions[level]
            if level == 0:  # ul_init = down_shift(conv(1x3)) + right_shift(conv(2x1))
                self.write("ul_init", 0, region, self.shifted_conv(m.ul_init_up, "input", region, down=1)
                           + self.shifted_conv(m.ul_init_left, "input", region, right=1))
            else:
                last = f"up_ul{level - 1}.{len(m.up_ul[level - 1]) - 1}"
                self.write(previous, level, region, self.conv(m.downsize_ul[level - 1], last, region))
            for k, block in enumerate(m.up_ul[level]):
                self.resnet(block, f"up_ul{level}.{k}", previous, [f"up_u{level}.{k}"], level, region)
                previous = f"up_ul{level}.{k}"

        for level in reversed(range(NUM_RESOLUTIONS)):  # down pass, coarsest first
            down = NUM_RESOLUTIONS - 1 - level
            previous = self.ul_skips["start"] if down == 0 else f"upsize_ul{level + 1}"
            if level not in regions:
                continue
            region = regions[level]
            for k, block in enumerate(m.down_ul[down]):
                self.resnet(block, f"down_ul{level}.{k}", previous,
                            [f"down_u{level}.{k}", self.ul_skips[down, k]], level, region)
                previous = f"down_ul{level}.{k}"
            if level > 0:  # position (a, b) feeds a 2x2 block of the finer grid
                up = m.upsize_ul[down](self.read(previous, region))
                self.write(f"upsize_ul{level}", level - 1, tuple(2 * x for x in region), up)
