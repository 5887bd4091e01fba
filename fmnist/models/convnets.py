"""Convolutional classifiers: ``paper`` (the study's notebook network), ``resnet`` (a residual
family a search samples) and ``whitened`` (the ``fast`` recipe's, after Keller Jordan's airbench).
"""

from __future__ import annotations

import torch
from torch import nn

PATCH_DIMS = 4  # a 2x2 patch of a grayscale image, as the whitening convolution sees it
WHITENING_EPS = 5e-4  # added to the patch covariance's eigenvalues (airbench's value)


def conv_bn(c_in: int, c_out: int, padding: int, activation: nn.Module) -> list[nn.Module]:
    # a conv bias is redundant before BatchNorm; the paper network has one all the same
    conv = nn.Conv2d(c_in, c_out, 3, padding=padding, bias=padding == 0)
    return [conv, nn.BatchNorm2d(c_out), activation]


class PaperCNN(nn.Module):
    """The study's CNN as its notebook builds it (convolutions without padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16, 0, nn.LeakyReLU(0.2)),  # 28 -> 26
            nn.MaxPool2d(2),  # -> 13
            *conv_bn(16, 32, 0, nn.LeakyReLU(0.2)),  # -> 11
            *conv_bn(32, 64, 0, nn.LeakyReLU(0.2)),  # -> 9
            nn.MaxPool2d(2),  # -> 4
            nn.Conv2d(64, 128, 3),  # -> 2: 128 x 2 x 2 = 512 features
        )
        hidden = [nn.Flatten(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU()]
        self.head = nn.Sequential(*hidden, nn.Linear(128, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images.unsqueeze(1)))


class ResidualBlock(nn.Module):
    """Two padded 3x3 conv-BN-ReLU layers added to their input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(channels, channels, 1, nn.ReLU(inplace=True)),
            *conv_bn(channels, channels, 1, nn.ReLU(inplace=True)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet(nn.Module):
    """Stem, ``stages`` x (widen, max-pool, ``blocks`` residual blocks), pool, dropout, linear."""

    def __init__(self, width=32, blocks=1, stages=3, dropout=0.0, stem_pool=False) -> None:
        if int(width) < 1 or int(blocks) < 0 or not 1 <= int(stages) <= 4:
            raise ValueError(
                f"invalid resnet spec: width {width}, blocks {blocks}, stages {stages}"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        width, blocks, stages, dropout = int(width), int(blocks), int(stages), float(dropout)
        super().__init__()
        layers: list[nn.Module] = conv_bn(1, width, 1, nn.ReLU(inplace=True))
        if stem_pool:
            # halving the map after the stem makes every later layer 4x cheaper
            layers.append(nn.MaxPool2d(2))
        widths = [width, *(width * 2**stage for stage in range(stages))]
        for c_in, out in zip(widths, widths[1:], strict=False):
            layers += conv_bn(c_in, out, 1, nn.ReLU(inplace=True))
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            layers += [ResidualBlock(out) for _ in range(blocks)]
        self.features = nn.Sequential(*layers)
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)]
        self.head = nn.Sequential(*pool, nn.Linear(widths[-1], 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images.unsqueeze(1)))


class WhitenedCNN(nn.Module):
    """airbench's: whitening, ``stages`` conv blocks, max-pool (28 -> 27 -> 13 -> 6 -> 3)."""

    def __init__(self, width: int = 32, stages: int = 3) -> None:
        if int(width) < 1 or not 1 <= int(stages) <= 3:
            raise ValueError(f"invalid whitened spec: width {width}, stages {stages} (1 to 3)")
        width, stages = int(width), int(stages)
        super().__init__()
        # each whitened direction is kept with both signs, so the GELU after it loses nothing
        self.whiten = nn.Conv2d(1, 2 * PATCH_DIMS, 2, bias=True)
        self.whiten.requires_grad_(False)  # fitted to the data once (``fit_whitening``)
        layers: list[nn.Module] = [nn.GELU()]
        widths = [2 * PATCH_DIMS, *(width * 2**stage for stage in range(stages))]
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            layers += whitened_block(c_in, c_out)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], 10, bias=False)

    @torch.no_grad()
    def fit_whitening(self, images: torch.Tensor, sample: int = 5000) -> None:
        """Set the first convolution to whiten the 2x2 patches of ``images`` in [0, 1]: zero
        mean, unit variance along each eigenvector of their covariance."""
        patches = images[:sample].float().unsqueeze(1).unfold(2, 2, 1).unfold(3, 2, 1)
        patches = patches.reshape(-1, PATCH_DIMS).double()
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
        scaled = eigenvectors.T / torch.sqrt(eigenvalues + WHITENING_EPS)[:, None]
        weight = torch.cat([scaled, -scaled])
        self.whiten.weight.copy_(weight.reshape(-1, 1, 2, 2).float())
        self.whiten.bias.copy_(-(weight @ patches.mean(0)).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(self.whiten(images.unsqueeze(1)))
        # airbench's fixed 1/9 scale keeps the first logits small, as a tuned temperature would
        return self.head(torch.amax(x, dim=(2, 3))) / 9.0


def whitened_block(c_in: int, c_out: int) -> list[nn.Module]:
    """conv, pool, BN, GELU, conv, BN, GELU; the convolutions start as identities (dirac)."""
    first = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    second = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
    nn.init.dirac_(first.weight[:c_in])
    nn.init.dirac_(second.weight)
    norms = [nn.BatchNorm2d(c_out) for _ in range(2)]
    for norm in norms:  # airbench: a trained scale adds nothing before GELU and the next conv
        norm.weight.requires_grad_(False)
    return [first, nn.MaxPool2d(2), norms[0], nn.GELU(), second, norms[1], nn.GELU()]


def build_cnn(arch: str = "paper", **options) -> nn.Module:
    """Build a CNN from its spec (``family`` already removed): ``arch`` plus its options."""
    return builder_for(arch)(**options)


def builder_for(arch: str):
    """The class that builds ``arch`` (its parameters are the options)."""
    builders = {"paper": PaperCNN, "resnet": ResNet, "whitened": WhitenedCNN}
    if arch not in builders:
        raise ValueError(f"unknown CNN arch {arch!r} (known: {', '.join(builders)})")
    return builders[arch]


def layer_output_sizes(model: nn.Module, batch: int = 2) -> list[tuple[str, str, tuple]]:
    """(name, layer type, output shape) of every leaf layer for a dummy batch, in call order."""
    rows: list[tuple[str, str, tuple]] = []

    def record(name: str):
        return lambda m, _i, out: rows.append((name, type(m).__name__, tuple(out.shape[1:])))

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    hooks = [module.register_forward_hook(record(name)) for name, module in leaves]
    was_training, device = model.training, next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(batch, 28, 28, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return rows


def describe(model: nn.Module) -> str:
    """Text summary: each layer's output shape and parameter count, the total, the module tree."""
    modules = dict(model.named_modules())
    lines = [f"{'layer':<28} {'type':<18} {'output':<16} {'params':>9}"]
    for name, kind, shape in layer_output_sizes(model):
        count = sum(p.numel() for p in modules[name].parameters())
        lines.append(f"{name:<28} {kind:<18} {str(shape):<16} {count:>9,}")
    total = sum(p.numel() for p in model.parameters())
    lines += ["", f"total parameters: {total:,}", "", str(model)]
    return "\n".join(lines) + "\n"
