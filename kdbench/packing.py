"""Packed students: K torchvision MobileNetV2s fused into one network.

On a GPU a small student is launch-bound, so K students (one sweep trial each,
with their own loss weights / temperature) train faster as *one* network that
sees the same batch.  Member ``i`` of the K members maps onto the packed model
as follows (``C_in -> C_out`` with ``g`` groups is a torchvision layer):

* stem conv ``features.0.0``: the image is shared, so ``3 -> K*C_out`` with one
  group; output channels ``[i*C_out, (i+1)*C_out)`` belong to member ``i``.
* every later conv: ``K*C_in -> K*C_out`` with ``K*g`` groups (depthwise convs:
  ``K*C`` groups).  Member ``i`` owns groups ``[i*g, (i+1)*g)``, i.e. input
  channels ``[i*C_in, (i+1)*C_in)`` and output channels ``[i*C_out, (i+1)*C_out)``.
* ``BatchNorm2d`` over ``K*C`` channels.  Its statistics are per channel, hence
  per member, so train-mode normalisation and running-stat updates are exact.
* classifier: :class:`GroupedLinear`, K independent ``Linear(1280, classes)``.

Every packed tensor is therefore the concatenation of the K member tensors
along dim 0 under the *same* state-dict key as torchvision; the one exception is
``num_batches_tracked``, a single counter shared by all members (it counts
forward passes, which all members see together).  Unpacking is a split along
dim 0.  The output is member-major ``[K, B, num_classes]``: member ``i``'s loss
uses ``out[i]``.  Reduce the member losses with a *sum* (a mean over K scales
every member's gradient by ``1/K``).

Exactness and its limits:

* Forward, gradients and BN statistics equal those of K separate models up to
  float rounding (grouped and ungrouped conv kernels may sum in another order).
* Dropout is one ``nn.Dropout`` over the ``[B, K*1280]`` pooled features: masks
  are drawn independently per member and sample, the same distribution as K
  separate models but not the same masks.  Bitwise comparisons with separate
  models need eval mode or ``dropout=0``.
* A member's parameters are disjoint slices of the packed tensors and their
  gradients depend only on that member's loss.  Optimisers whose update is
  elementwise (SGD with momentum / weight decay / Nesterov, Adam, AdamW,
  RMSprop) thus act exactly as K independent optimisers.  Anything using a norm
  over a whole tensor or over all parameters (LARS/LAMB trust ratios,
  ``clip_grad_norm_``) couples the members and is not equivalent.  All members
  share the optimiser's learning rate and schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torchvision
from torch import Tensor, nn

_SHARED_SUFFIX = "num_batches_tracked"


class GroupedLinear(nn.Module):
    """K independent ``nn.Linear(in_features, out_features)``: ``[B, K*in] -> [K, B, out]``.

    ``weight`` is ``[K*out, in]`` and ``bias`` ``[K*out]``: member ``i``'s Linear
    tensors are rows ``[i*out, (i+1)*out)``, matching the packing of the convs.
    Initialised like torchvision's MobileNetV2 classifier.
    """

    def __init__(self, k: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight = nn.Parameter(torch.empty(k * out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(k * out_features))
        nn.init.normal_(self.weight, 0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = x.unflatten(1, (self.k, self.in_features)).transpose(0, 1)  # [K, B, in]
        weight = self.weight.view(self.k, self.out_features, self.in_features)
        bias = self.bias.view(self.k, 1, self.out_features)
        return torch.baddbmm(bias, x, weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}"


def _packed_conv(conv: nn.Conv2d, k: int, shared_input: bool) -> nn.Conv2d:
    """The K-member version of ``conv``; with ``shared_input`` all members read the same input."""
    return nn.Conv2d(
        conv.in_channels if shared_input else k * conv.in_channels,
        k * conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=conv.groups if shared_input else k * conv.groups,
        bias=conv.bias is not None,
    )


def _pack_features(features: nn.Sequential, k: int) -> nn.Sequential:
    """Swap, in place, every Conv2d / BatchNorm2d of torchvision's ``features`` for its packed version."""
    stem = features[0][0]
    for name, module in list(features.named_modules()):
        if isinstance(module, nn.Conv2d):
            features.set_submodule(name, _packed_conv(module, k, shared_input=module is stem))
        elif isinstance(module, nn.BatchNorm2d):
            features.set_submodule(name, nn.BatchNorm2d(k * module.num_features, module.eps, module.momentum))
    return features


def pack_state_dicts(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Pack K torchvision MobileNetV2 state dicts into one :class:`PackedMobileNetV2` state dict.

    Tensors are concatenated along dim 0; ``num_batches_tracked`` is shared and
    must agree across members.
    """
    if not states:
        raise ValueError("pack_state_dicts needs at least one state dict")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"state dict {i} has other keys than state dict 0: the members must share one architecture")
    packed = {}
    for key in keys:
        tensors = [state[key] for state in states]
        if key.endswith(_SHARED_SUFFIX):
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise ValueError(f"{key} differs across members: packed members must have trained for the same steps")
            packed[key] = tensors[0].clone()
        else:
            packed[key] = torch.cat(tensors)
    return packed


def unpack_state_dict(packed: Mapping[str, Tensor], k: int) -> list[dict[str, Tensor]]:
    """Split a packed state dict (or any mapping of packed tensors, e.g. gradients) into K member dicts."""
    members: list[dict[str, Tensor]] = [{} for _ in range(k)]
    for key, tensor in packed.items():
        parts = [tensor] * k if key.endswith(_SHARED_SUFFIX) else tensor.unflatten(0, (k, -1)).unbind(0)
        for member, part in zip(members, parts):
            member[key] = part.detach().clone()
    return members


class PackedMobileNetV2(nn.Module):
    """K torchvision ``mobilenet_v2(num_classes, width_mult, dropout)`` students in one network.

    ``forward`` maps a shared ``[B, 3, H, W]`` batch to member-major logits
    ``[K, B, num_classes]``.  Each member is initialised exactly as a fresh
    torchvision model would be.  See the module docstring for the packing.
    """

    def __init__(self, k: int, num_classes: int, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.num_classes = k, num_classes
        members = [
            torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult, dropout=dropout) for _ in range(k)
        ]
        states = [member.state_dict() for member in members]
        # members[0] serves as the layout template; its state was captured above.
        self.features = _pack_features(members[0].features, k)
        head = members[0].classifier[1]
        self.classifier = nn.Sequential(nn.Dropout(dropout), GroupedLinear(k, head.in_features, num_classes))
        self.load_state_dict(pack_state_dicts(states))

    @classmethod
    def from_members(cls, models: Sequence[nn.Module], width_mult: float = 1.0) -> PackedMobileNetV2:
        """Pack torchvision MobileNetV2s (weights, BN running statistics and counters).

        The packed model lives on the first member's device, in its dtype.
        """
        dropout, head = models[0].classifier
        packed = cls(len(models), head.out_features, width_mult=width_mult, dropout=dropout.p)
        packed.to(head.weight.device, head.weight.dtype)
        packed.load_state_dict(pack_state_dicts([model.state_dict() for model in models]))
        return packed

    def unpack(self) -> list[dict[str, Tensor]]:
        """K state dicts that load with ``strict=True`` into torchvision ``mobilenet_v2(num_classes)``."""
        return unpack_state_dict(self.state_dict(), self.k)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)
