"""Small reference models written the way users write them (torchvision does not import here).
Used by tests/test_graph.py, also as --model-code targets (``tests/models_zoo.py:NAME``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights, and norms away from their default init (defaults would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block=BasicBlock, layers=(2, 2, 2, 2), width=8, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make(block, width, layers[0], 1)
        self.layer2 = self._make(block, width * 2, layers[1], 2)
        self.layer3 = self._make(block, width * 4, layers[2], 2)
        self.layer4 = self._make(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make(self, block, planes, blocks, stride):
        layers = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(width: int = 8, num_classes: int = 10):
    return ResNet(BasicBlock, (2, 2, 2, 2), width, num_classes)


def resnet_bottleneck(width: int = 4, num_classes: int = 10):
    return ResNet(Bottleneck, (1, 2, 1, 1), width, num_classes)


# ----------------------------------------------------------------------------- Inception


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionModule(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
        super().__init__()
        self.b1 = ConvBN(cin, c1, 1)
        self.b2 = nn.Sequential(ConvBN(cin, c3r, 1), ConvBN(c3r, c3, 3, padding=1))
        self.b3 = nn.Sequential(ConvBN(cin, c5r, 1), ConvBN(c5r, c5, 3, padding=1), ConvBN(c5, c5, 3, padding=1))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBN(cin, pp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = ConvBN(3, 8, 3, padding=1)
        self.inc1 = InceptionModule(8, 4, 4, 6, 2, 3, 3)  # 16 out
        self.inc2 = InceptionModule(16, 6, 4, 8, 2, 4, 4)  # 22 out
        self.fc = nn.Linear(22, num_classes)

    def forward(self, x):
        x = self.inc2(F.max_pool2d(self.inc1(self.stem(x)), 2))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ----------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats):
        x = torch.cat(feats, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseNet(nn.Module):
    def __init__(self, growth=4, layers=3, num_classes=10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([DenseLayer(8 + i * growth, growth) for i in range(layers)])
        c = 8 + layers * growth
        self.norm5 = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        feats = [self.conv0(x)]
        for layer in self.layers:
            feats.append(layer(feats))
        x = F.relu(self.norm5(torch.cat(feats, 1)))
        return self.classifier(F.adaptive_avg_pool2d(x, (1, 1)).flatten(1))


# ----------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)),
            InvertedResidual(8, 8, 1, 3), InvertedResidual(8, 12, 2, 3), InvertedResidual(12, 12, 1, 3),
            nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ----------------------------------------------------------------------------- plain and functional


def sequential_cnn(num_classes: int = 10):
    """A user's nn.Sequential: numeric names 0, 1, ..."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 4 * 2, 16), nn.ReLU(), nn.Linear(16, num_classes))


class FunctionalNet(nn.Module):
    """forward uses F.relu, torch.cat, x + y, x.flatten(1) and x.view(n, -1)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 5, 3, padding=1)
        self.d = nn.Conv2d(6, 4, 1)
        self.fc1 = nn.Linear(9 * 8 * 4, 12)
        self.fc2 = nn.Linear(12 + 9 * 8 * 4, num_classes)

    def forward(self, x):
        y = F.relu(self.a(x)) + F.relu(self.b(x))
        z = torch.cat([F.relu(self.c(y)), self.d(y)], 1)
        z = F.max_pool2d(z, 2)
        n = z.shape[0]
        h = F.relu(self.fc1(z.view(n, -1)))
        return self.fc2(torch.cat([h, z.flatten(1)], dim=1))


# ----------------------------------------------------------------------------- U-Net


class UNet(nn.Module):
    """Encoder convs whose outputs are both skipped and downsampled; ConvTranspose2d upsampling;
    decoder convs reading torch.cat([upsampled, skip])."""

    def __init__(self, c=4, num_classes=3):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = nn.Sequential(nn.Conv2d(4 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        s1 = self.enc1(x)
        s2 = self.enc2(F.max_pool2d(s1, 2))
        m = self.mid(F.max_pool2d(s2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), s2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], 1))
        return self.head(d1)


# ----------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Hand-written multi-head self-attention: one fused qkv Linear laid out (3, heads, head_dim)."""

    def __init__(self, dim, num_heads, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * self.scale
        out = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(out)


class SplitAttention(nn.Module):
    """Hand-written attention with separate q, k, v Linears and F.scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class TorchAttention(nn.Module):
    """nn.MultiheadAttention (packed in_proj_weight q|k|v, out_proj), batch first."""

    def __init__(self, dim, num_heads, head_dim):
        super().__init__()
        assert dim == num_heads * head_dim
        self.mha = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class ViTBlock(nn.Module):
    def __init__(self, dim, num_heads, head_dim, mlp, attn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image=16, patch=4, dim=24, depth=2, num_heads=3, head_dim=8, mlp=48, classes=5,
                 attn="fused"):
        super().__init__()
        kind = {"fused": Attention, "split": SplitAttention, "torch": TorchAttention}[attn]
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, num_heads, head_dim, mlp, kind) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


def vit_split():
    return ViT(attn="split")


def vit_torch():
    return ViT(dim=24, num_heads=3, head_dim=8, attn="torch")


# ----------------------------------------------------------------------------- random graphs (property tests)


class Towers(nn.Module):
    """Two conv-bn-relu towers, concatenated on channels."""

    def __init__(self, cin, a, b):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, a, 1), nn.BatchNorm2d(a), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(cin, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class ConvLN(nn.Module):
    """conv, LayerNorm over the channels (channels-last, as ConvNeXt), ReLU."""

    def __init__(self, cin, w):
        super().__init__()
        self.conv = nn.Conv2d(cin, w, 3, padding=1)
        self.ln = nn.LayerNorm(w)

    def forward(self, x):
        return F.relu(self.ln(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class RandomGraph(nn.Module):
    """Built from ``arch``: a list of [kind, widths...]: ["cbr", w] conv-bn-relu, ["res"] a BasicBlock
    (residual add), ["cat", a, b] concatenated towers, ["gn", w, groups] conv-GroupNorm-relu,
    ["ln", w] conv-LayerNorm(channels)-relu; then flatten and a linear head."""

    def __init__(self, arch, c=4, hw=6, hidden=0, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        mods, ch = [], c
        for kind, *w in arch:
            if kind == "cbr":
                mods.append(nn.Sequential(nn.Conv2d(ch, w[0], 3, padding=1), nn.BatchNorm2d(w[0]), nn.ReLU()))
                ch = w[0]
            elif kind == "res":
                mods.append(BasicBlock(ch, ch))
            elif kind == "gn":
                mods.append(nn.Sequential(nn.Conv2d(ch, w[0], 3, padding=1), nn.GroupNorm(w[1], w[0]), nn.ReLU()))
                ch = w[0]
            elif kind == "ln":
                mods.append(ConvLN(ch, w[0]))
                ch = w[0]
            else:
                mods.append(Towers(ch, w[0], w[1]))
                ch = w[0] + w[1]
        self.blocks = nn.Sequential(*mods)
        feats = ch * hw * hw
        self.fc = nn.Sequential(nn.Linear(feats, hidden), nn.ReLU(), nn.Linear(hidden, classes)) if hidden \
            else nn.Linear(feats, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.blocks(self.stem(x)), 1))


# ----------------------------------------------------------------------------- constructors exposing sizes


def mlp(inp: int = 6, hidden=(16, 12), classes: int = 3):
    """An MLP whose constructor takes its hidden sizes (a list): a widened student is mlp(hidden=[...])."""
    layers, c = [], inp
    for h in hidden:
        layers += [nn.Linear(c, h), nn.ReLU()]
        c = h
    return nn.Sequential(*layers, nn.Linear(c, classes))
