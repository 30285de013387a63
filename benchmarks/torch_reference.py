"""A PyTorch CycleGAN training step with the project's architecture, as a speed reference only.

PyTorch is not a dependency of microsr-tf: ``bench_train.py`` imports this module when ``torch`` is
installed (``pip install torch``, a CPU build) and adds its rate beside the TensorFlow steps. The networks
follow ``ResnetGenerator`` and ``PatchDiscriminator`` layer for layer (reflection padding, 7x7 stem, two
stride-2 convolutions, residual blocks, bottleneck dropout always on, two stride-2 transposed
convolutions, 7x7 head and sigmoid; 4x4 PatchGAN critics with instance norm and LeakyReLU 0.2). The step
is the one of the pytorch-CycleGAN-and-pix2pix reference implementation with this project's objective:
generators first (critics held fixed), then critics on the detached fakes, one Adam per pair.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True),
                                  nn.ReLU(True), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                  nn.InstanceNorm2d(c, affine=True))

    def forward(self, x):
        return x + self.body(x)


def generator(ngf: int, n_blocks: int, rate: float = 0.5) -> nn.Module:
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(1, ngf, 7), nn.InstanceNorm2d(ngf, affine=True), nn.ReLU(True)]
    for mult in (1, 2):
        layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                   nn.InstanceNorm2d(ngf * mult * 2, affine=True), nn.ReLU(True)]
    layers += [_Block(4 * ngf) for _ in range(n_blocks)]

    class AlwaysOnDropout(nn.Module):
        def forward(self, x):
            return F.dropout(x, rate, training=True)

    layers.append(AlwaysOnDropout())
    for mult in (4, 2):
        layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                   nn.InstanceNorm2d(ngf * mult // 2, affine=True), nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 1, 7), nn.Sigmoid()]
    return nn.Sequential(*layers)


def critic(ndf: int, n_layers: int = 3) -> nn.Module:
    layers = [nn.Conv2d(1, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    filters = ndf
    for i in range(1, n_layers + 1):
        out = ndf * min(2**i, 8)
        layers += [nn.Conv2d(filters, out, 4, stride=2 if i < n_layers else 1, padding=1),
                   nn.InstanceNorm2d(out, affine=True), nn.LeakyReLU(0.2, True)]
        filters = out
    layers.append(nn.Conv2d(filters, 1, 4, padding=1))
    return nn.Sequential(*layers)


class TorchCycleGANStep:
    """``step(x, y)``: one optimisation step of both generators, then both critics (float32, CPU)."""

    def __init__(self, ngf: int, n_blocks: int, ndf: int, n_layers: int = 3, lambda_rec: float = 10.0,
                 lambda_adv: float = 1.0, learning_rate: float = 1e-4, beta_1: float = 0.5, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.g_l, self.g_h = generator(ngf, n_blocks), generator(ngf, n_blocks)
        self.d_l, self.d_h = critic(ndf, n_layers), critic(ndf, n_layers)
        gens = list(self.g_l.parameters()) + list(self.g_h.parameters())
        critics = list(self.d_l.parameters()) + list(self.d_h.parameters())
        self.opt_g = torch.optim.Adam(gens, learning_rate, betas=(beta_1, 0.999))
        self.opt_d = torch.optim.Adam(critics, learning_rate, betas=(beta_1, 0.999))
        self.lambda_rec, self.lambda_adv = lambda_rec, lambda_adv

    @staticmethod
    def _gan(logits: torch.Tensor, real: bool) -> torch.Tensor:
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        for net in (self.d_l, self.d_h):
            net.requires_grad_(False)
        fake_hr, fake_lr = self.g_l(x), self.g_h(y)
        cycle = (x - self.g_h(fake_hr)).abs().mean() + (y - self.g_l(fake_lr)).abs().mean()
        adv = self._gan(self.d_h(fake_hr), True) + self._gan(self.d_l(fake_lr), True)
        g_loss = self.lambda_adv * adv + self.lambda_rec * cycle
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        for net in (self.d_l, self.d_h):
            net.requires_grad_(True)
        d_loss = 0.5 * (self._gan(self.d_h(y), True) + self._gan(self.d_h(fake_hr.detach()), False)
                        + self._gan(self.d_l(x), True) + self._gan(self.d_l(fake_lr.detach()), False))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        return float(g_loss.detach())
