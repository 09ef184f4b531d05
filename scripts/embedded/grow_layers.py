"""A deeper U-ViT that starts out computing exactly what a trained one computes: copy a pipeline folder and give its
transformer more layers, each new one a copy of the layer before it with its three residual outputs (self-attention,
cross-attention, MLP) zeroed, so that it adds nothing until training moves those weights (zero-initialised residual
branches; the copied weights give the new layer useful features from the first step). New layers are spread evenly
between the old ones. `amused finetune --pretrained_model_name_or_path OUT` then trains the deeper model.

    python scripts/embedded/grow_layers.py PIPELINE_DIR OUT_DIR --layers 10
"""

import argparse
import copy
import dataclasses
import shutil
from pathlib import Path

import torch

from amused.loading import load_model, save_model
from amused.models.uvit import UViT, UViTConfig


def layer_plan(old: int, new: int) -> list[int | None]:
    """For each layer of the grown stack, the old layer it is (an int) or None where a new layer goes: the
    new ones spread evenly, each after an old one."""
    if new < old:
        raise ValueError(f"--layers {new} is fewer than the model's {old} layers")
    extra = new - old
    after = {round((i + 1) * old / (extra + 1)) - 1 for i in range(extra)} if extra <= old else set(range(old))
    plan, added = [], 0
    for i in range(old):
        plan.append(i)
        if i in after and added < extra:
            plan.append(None)
            added += 1
    plan += [None] * (extra - added)  # more new layers than old ones: the rest at the end
    return plan


def zero_residuals(layer: torch.nn.Module) -> None:
    """The layer's three residual branches end in zeros: it is the identity map."""
    with torch.no_grad():
        for linear in (layer.attn1.to_out[0], layer.attn2.to_out[0], layer.ff.net[-1]):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


def grow(model: UViT, layers: int) -> UViT:
    """A copy of `model` with `layers` transformer layers (`layer_plan`); everything else is the model's own."""
    grown = copy.deepcopy(model)
    grown.config = dataclasses.replace(model.config, num_hidden_layers=layers)
    stack, last = [], None
    for source in layer_plan(model.config.num_hidden_layers, layers):
        if source is not None:
            last = source
        stack.append(copy.deepcopy(model.transformer_layers[last]))
        if source is None:
            zero_residuals(stack[-1])
    grown.transformer_layers = torch.nn.ModuleList(stack)
    return grown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline", type=Path, help="pipeline folder (model_index.json, transformer/, vqvae/, ...)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, required=True, help="transformer layers of the grown model")
    args = ap.parse_args()
    model = load_model(UViT, UViTConfig, args.pipeline / "transformer")
    grown = grow(model, args.layers)
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.pipeline, args.out, ignore=shutil.ignore_patterns("transformer"))
    (args.out / "transformer").mkdir()
    save_model(grown, args.out / "transformer", "UVit2DModel")
    n = sum(p.numel() for p in grown.parameters())
    print(f"{args.out}: {model.config.num_hidden_layers} -> {args.layers} layers, {n / 1e6:.2f} M parameters, "
          f"plan {layer_plan(model.config.num_hidden_layers, args.layers)}")


if __name__ == "__main__":
    main()
