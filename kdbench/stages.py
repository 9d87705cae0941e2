"""Which feature maps of a torchvision classifier are its stages: the one table of kdbench.

Stage ``i`` (``i = 0 .. 4``) of every supported model is the output of its **last block at stride**
``2^(i+1)`` (a block: a child module of the model's ``features`` trunk, or of the model itself for ResNets):
the output of its downsampling stage at that resolution, just before the next stride-2 block (for the last
stage: before global pooling).  So at a resolution that is a multiple of 32 stage ``i`` of any two models
has the same height and width, ``resolution / 2^(i+1)``, and a teacher's and a student's stage ``i`` pair
up one to one (channel counts differ).  ``pooled`` is the global average of stage 4, ``[B, C4]``: the
"pooled feature" of mdistiller (ResNet, MobileNetV2: exactly the classifier's input before dropout).

Each entry names torchvision graph nodes (:func:`torchvision.models.feature_extraction.get_graph_node_names`;
a module name stands for the module's last node), which :class:`kdbench.engine.features.FeatureTap` reads
with ``create_feature_extractor``; tests/test_stages.py checks every family against that rule on the
traced graph.  Torch-free: the sweep plans and refuses pairs with it without loading torch.

============================  ==========================================================================
family                        stage nodes (strides 2, 4, 8, 16, 32)
============================  ==========================================================================
``vgg11/13/16/19[_bn]``       the ReLU ending conv blocks 2-5 (before their max-pool), then the last max-pool
                              (VGG16: ``features.8 .15 .22 .29 .30``; VGG16-BN: ``features.12 .22 .32 .42 .43``)
``resnet*``, ``resnext*``,    ``relu`` (the stem, before its max-pool), ``layer1`` .. ``layer4``
``wide_resnet*``
``mobilenet_v2``              ``features.1 .3 .6 .13 .18`` (``.18``: the 1x1 convolution to 1280 channels)
``mobilenet_v3_large``        ``features.1 .3 .6 .12 .16``
``mobilenet_v3_small``        ``features.0 .1 .3 .8 .12``
============================  ==========================================================================
"""

from __future__ import annotations

import re

from kdbench.errors import UserError

N_STAGES = 5
STAGE_NEEDS = tuple(f"stage:{i}" for i in range(N_STAGES))  # what a method names to get stage i ([B, C_i, H_i, W_i])
POOLED = "pooled"  # the global average of the last stage, [B, C_4]
MULTIPLE = 2**N_STAGES  # a resolution at which every stage of every model has the same size: a multiple of 32

# Convolutions per block of torchvision's VGG configurations (torchvision.models.vgg.cfgs "A", "B", "D", "E")
_VGG_BLOCKS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_FIXED = {
    "mobilenet_v2": ("features.1", "features.3", "features.6", "features.13", "features.18"),
    "mobilenet_v3_large": ("features.1", "features.3", "features.6", "features.12", "features.16"),
    "mobilenet_v3_small": ("features.0", "features.1", "features.3", "features.8", "features.12"),
}
_RESNET = re.compile(r"(resnet|resnext|wide_resnet)\d")
_VGG = re.compile(r"vgg(\d+)(_bn)?")
FAMILIES = "vgg11/13/16/19 (and _bn), resnet*, resnext*, wide_resnet*, mobilenet_v2, mobilenet_v3_large/small"


def stride(index: int) -> int:
    """The stride (input pixels per feature-map pixel) of stage ``index``."""
    return 2 ** (index + 1)


def stage_index(need: str) -> int | None:
    """``i`` for the need ``"stage:i"``; None for any other need."""
    return STAGE_NEEDS.index(need) if need in STAGE_NEEDS else None


def uses_stages(needs) -> bool:
    """Whether ``needs`` names a stage or the pooled feature (which come from the stage table)."""
    return any(n == POOLED or n in STAGE_NEEDS for n in needs)


def stage_nodes(model: str) -> tuple[str, ...] | None:
    """The graph nodes of stages 0-4 of torchvision model ``model``, or None for a family kdbench has no entry for."""
    if model in _FIXED:
        return _FIXED[model]
    if _RESNET.match(model):
        return ("relu", "layer1", "layer2", "layer3", "layer4")
    match = _VGG.fullmatch(model)
    if match and int(match[1]) in _VGG_BLOCKS:
        per_conv = 3 if match[2] else 2  # conv, (batch norm,) ReLU
        nodes, position = [], 0
        for convs in _VGG_BLOCKS[int(match[1])]:
            position += convs * per_conv  # the block's modules; ``position`` is now its max-pool's index
            nodes.append(f"features.{position - 1}")  # the ReLU before the pool
            position += 1
        return (*nodes[1:], f"features.{position - 1}")  # blocks 2-5 (strides 2-16), then the last pool (32)
    return None


def check_pair(method: str, teacher: str, student: str, resolution: int) -> None:
    """Refuse, in one line, a teacher/student pair whose stages ``method`` cannot match.

    Raises:
        UserError: either model has no entry in the stage table, or ``resolution`` is not a multiple of 32
            (then a teacher's and a student's stage maps can differ in size by one pixel: pooling rounds down,
            padded strided convolutions round up).
    """
    for role, model in (("teacher", teacher), ("student", student)):
        if stage_nodes(model) is None:
            raise UserError(
                f"{method} distils stage features, and kdbench maps no stages of the {role} {model}: "
                f"use a {role} of {FAMILIES}, or add its family to kdbench/stages.py"
            )
    if resolution % MULTIPLE:
        raise UserError(
            f"{method} matches the teacher's and the student's stages by size: data.resolution must be a multiple "
            f"of {MULTIPLE} (then stage i is resolution / 2^(i+1) pixels in both), got {resolution}"
        )
