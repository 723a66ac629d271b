"""`quill attention`: a model's attention weights for one text, as a PNG grid of heatmaps (a row per layer, a column
per head), with the numbers beside it.

    quill attention MODEL_OR_DIR "some text" [--output FILE] [--layers 0,2] [--max-tokens N] [--trust-remote-code]

The model (any stage's folder, any Hub-format folder or Hub id) is loaded with eager attention, the one backend that
returns the weights (Quill's packed default does not), and run once on the text. Each heatmap has the query tokens
as rows and the key tokens as columns; in a causal model every row sums to 1 and is 0 above the diagonal. The
weights are also written beside the PNG as `.npz` (`attentions`: [layers, heads, tokens, tokens], `tokens`,
`layers`). Default output: ./attention/<model name>.png (never inside the model folder).
"""

import argparse
import sys
from pathlib import Path

from quill.errors import QuillError, one_line, run_guarded

MAX_TOKENS = 64  # beyond this a heatmap cell is a pixel or two: nothing can be read off it
CELL_INCHES = 2.4  # one heatmap's side


def attention_weights(model_name_or_path: str, text: str, trust_remote_code: bool = False, max_tokens=MAX_TOKENS):
    """(weights [layers, heads, tokens, tokens] as float32 numpy, token strings) of the model on `text`."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from quill.loading import check_model_path

    path = str(model_name_or_path)
    check_model_path(path)
    if not text.strip():
        raise QuillError("no text given", 'pass the text to look at, e.g. quill attention DIR "the cat sat"')
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        # The bare backbone (AutoModel) of a causal LM or a reward model alike: attention lives there.
        model = AutoModel.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise QuillError(
            f"model '{path}' could not be loaded ({one_line(err, 200)})",
            "pass a model folder or Hub id (add --trust-remote-code for custom code you trust)",
        ) from None
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] > max_tokens:
        raise QuillError(
            f"the text is {ids.shape[1]} tokens; a heatmap over more than {max_tokens} cannot be read",
            "shorten the text, or raise --max-tokens",
        )
    with torch.no_grad():
        out = model.eval()(input_ids=ids, output_attentions=True)
    if not getattr(out, "attentions", None) or any(a is None for a in out.attentions):
        raise QuillError(f"model '{path}' returned no attention weights", "use a model whose eager attention does")
    weights = torch.stack([a[0].float() for a in out.attentions]).numpy()
    return weights, tokenizer.convert_ids_to_tokens(ids[0].tolist())


def parse_layers(spec: str | None) -> list[int] | None:
    """--layers as numbers (None: all); checked against the model's depth once it is loaded."""
    if spec is None:
        return None
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise QuillError(f"--layers expected comma-separated layer numbers, found '{spec}'", "e.g. --layers 0,2")
    return layers


def draw(weights, tokens: list[str], layers: list[int], output: Path) -> None:
    """One heatmap per (layer, head): rows are layers, columns heads; every map on the same 0..1 colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = weights.shape[1]
    fig, axes = plt.subplots(
        len(layers), heads, figsize=(CELL_INCHES * heads, CELL_INCHES * len(layers)), squeeze=False
    )
    labels = [t.replace("\n", "\\n") for t in tokens] if len(tokens) <= 24 else None  # readable only when few
    for row, layer in enumerate(layers):
        for head in range(heads):
            ax = axes[row][head]
            ax.imshow(weights[layer, head], vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            if labels:
                ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
                ax.set_yticks(range(len(labels)), labels, fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    # No tight_layout: the grid's proportions (heads wide, layers tall) stay those of the figure size.
    fig.savefig(output, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quill attention", description="Attention heatmaps of a model on one text.")
    p.add_argument("model", help="model folder (any stage's output, or any Hub-format folder) or Hub id")
    p.add_argument("text", help="the text to run the model on")
    p.add_argument("--output", help="PNG file (default: attention/<model name>.png here); the .npz goes beside it")
    p.add_argument("--layers", help="comma-separated layer numbers to draw (default: all)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="refuse longer texts (default %(default)s)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code to run")
    return p


def run(argv: list[str] | None = None) -> Path:
    import numpy as np

    args = _parser().parse_args(argv)
    # Everything that can be checked without the model first: a typo costs no model load.
    if args.max_tokens < 1:
        raise QuillError(f"--max-tokens expected a positive number, found {args.max_tokens}")
    output = Path(args.output) if args.output else Path("attention") / f"{Path(args.model).name or 'model'}.png"
    if output.suffix.lower() != ".png":
        raise QuillError(f"--output '{output}' is not a .png file", "pass a file name ending in .png")
    layers = parse_layers(args.layers)
    weights, tokens = attention_weights(args.model, args.text, args.trust_remote_code, args.max_tokens)
    n_layers = weights.shape[0]
    if layers is None:
        layers = list(range(n_layers))
    elif not all(0 <= i < n_layers for i in layers):
        raise QuillError(f"--layers {args.layers}: the model has layers 0..{n_layers - 1}", "pick layers in that range")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        draw(weights, tokens, layers, output)
        np.savez(output.with_suffix(".npz"), attentions=weights[layers], tokens=np.array(tokens), layers=layers)
    except OSError as err:
        raise QuillError(f"could not write '{output}' ({err.strerror})", "pass --output a writable file") from None
    print(f"saved {output} ({len(layers)} layers x {weights.shape[1]} heads, {len(tokens)} tokens)", file=sys.stderr)
    return output


def main(argv: list[str] | None = None) -> None:
    run_guarded(lambda: run(argv))


if __name__ == "__main__":
    main()
