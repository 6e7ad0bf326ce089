"""dsnet: Dynamic Slimmable Networks (DS-Net, CVPR 2021) in plain PyTorch.

Public API::

    model = dsnet.create_model("ds_mbnet_v1", num_classes=1000)
    logits = model(x)                              # largest network
    logits = model(x, subnet=3)                    # uniform subnet 3
    logits, choices = model(x, subnet="dynamic", return_choices=True)
    dsnet.count_madds(model, subnet=0)             # 132,890,144 at 224 px
    dsnet.load_checkpoint(model, "DS_MBNet-70_1.pth.tar")

    resnet = dsnet.create_model("ds_resnet50", num_classes=1000, attention=False)
    dsnet.load_pretrained(resnet, "resnet50.pth")  # torch.save(torchvision_resnet.state_dict())

This package never imports Ray; the Ray layer lives in ``pipelines``.
"""

from dsnet.models.arch import (
    DS_MBNET_SMALL,
    DS_MBNET_V1,
    DS_RESNET50,
    DS_RESNET_SMALL,
    ArchSpec,
    ResNetSpec,
    StageSpec,
)
from dsnet.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from dsnet.models.madds import count_madds, expected_madds, routing_madds
from dsnet.models.mbnet import DSNet
from dsnet.models.pretrained import load_pretrained
from dsnet.models.registry import create_model, list_models, register_model
from dsnet.models.resnet import DSResNet  # registers ds_resnet50, ds_resnet_small
from dsnet.models.supernet import DSSupernet, DynamicOutput
from dsnet.version import __version__

__all__ = [
    "DS_MBNET_SMALL", "DS_MBNET_V1", "DS_RESNET50", "DS_RESNET_SMALL", "ArchSpec", "ResNetSpec",
    "StageSpec", "DSNet", "DSResNet", "DSSupernet", "DynamicOutput",
    "CheckpointError", "load_checkpoint", "load_pretrained", "model_from_checkpoint",
    "read_checkpoint", "save_checkpoint", "count_madds", "expected_madds", "routing_madds",
    "create_model", "list_models", "register_model", "__version__",
]
