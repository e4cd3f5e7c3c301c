"""Small real checkpoints that tests build offline (random weights, real classes, real from_pretrained)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_vit(path: Path, *, bias: tuple[float, float] | None = None, multi_label: bool = False) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit import ViTImageProcessorPil

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
        problem_type="multi_label_classification" if multi_label else None,
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    if bias is not None:
        # Fix the output regardless of the image, to check label order and the softmax/sigmoid choice.
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
