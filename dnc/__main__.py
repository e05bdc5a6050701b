"""Command line: ``python -m dnc layers SPEC --input 3,32,32 [--kwargs JSON]`` lists a model's
layer names with their output shapes (docs/models.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas (3,32,32), got {text!r}") \
            from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return shape


def _kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"num_classes\": 10}}', got {text!r}")
    return value


def layers_command(args: argparse.Namespace) -> str:
    """The text of `layers`: every node with its per-sample output shape and its width under the
    avg pool, the auto choice marked with *, and the classifier found."""
    from dnc.models.build import build_model
    from dnc.models.layers import example_input, find_classifier, pooled_width, probe_model, resolve_layers

    model = build_model(args.spec, args.kwargs, args.seed).eval()
    found = find_classifier(model, args.classifier)
    name = found[0] if found else None
    probe = probe_model(model, example_input(model, args.input), name)
    auto = {probe.resolve(a): a for a in resolve_layers(model, "auto", name, probe=probe)}
    rows = []
    for node in probe.nodes:
        shape = probe.shapes[node]
        avg = pooled_width(shape, "avg") if len(shape) else None
        rows.append(("*" if node in auto else " ", node, "(N, " + ", ".join(map(str, shape)) + ")"
                     if shape else "(N,)", "" if avg is None else f"{avg:,}",
                     f"auto: {auto[node]}" if node in auto and auto[node] != node else ""))
    wn = max(len(r[1]) for r in rows)
    ws = max(len(r[2]) for r in rows)
    lines = [f"{args.spec}: {len(rows)} layers for input (N, {', '.join(map(str, args.input))})"
             + ("" if probe.traced else " (not traceable: module names, forward hooks)"),
             f"  {'name':<{wn}}  {'output':<{ws}}  avg width"]
    lines += [f"{m} {n:<{wn}}  {s:<{ws}}  {w:>9}  {note}".rstrip() for m, n, s, w, note in rows]
    lines.append("* = layers: auto (" + ", ".join(auto.values()) + ")")
    if found:
        lines.append(f"classifier: {name} (Linear {found[1].in_features} -> {found[1].out_features}), "
                     f"its input: {probe.classifier_input or 'not found among the nodes'}")
    else:
        lines.append("classifier: none (the model does not end in an nn.Linear)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dnc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layers", help="list a model's layer names and output shapes",
                       description="List a model's layer names (torchvision feature-extraction node "
                                   "names) with their output shapes for one input shape.")
    p.add_argument("spec", help="torchvision:<builder>, timm:<name> or python:<file.py or module>:<callable>")
    p.add_argument("--input", type=_shape, required=True, help="one sample's shape, e.g. 3,32,32")
    p.add_argument("--kwargs", type=_kwargs, default={},
                   help='builder kwargs as JSON, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--classifier", default=None, help="module name of the classifier (default: found)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args(argv)
    from dnc.models.build import ModelSpecError
    from dnc.models.layers import LayerError

    try:
        print(layers_command(args))
    except (ModelSpecError, LayerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the model rejects the input shape
        print(f"error: {args.spec} fails on input (N, {', '.join(map(str, args.input))}): {e}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
