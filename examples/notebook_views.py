"""The original notebook's views of one model: per-head heatmaps, per-head rank and column
profiles of a chosen layer, and MaxRank over layers (the paper's N x T protocol).

    python examples/notebook_views.py --out views/            # a freshly trained small GPT
    python examples/notebook_views.py --llama2c stories260K.bin --layer 4 --out views/

Writes PNG files into --out and prints the per-layer table.
"""

import argparse
from pathlib import Path

import torch

import attn_probe
from attn_probe.outputs import plots
from attn_probe.outputs.tables import format_table


def small_trained_gpt(steps: int):
    from attn_probe.models.corpus import builtin_corpus
    from attn_probe.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    data = builtin_corpus().long()
    model = GPT(GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        ix = torch.randint(len(data) - 65, (16,))
        batch = torch.stack([data[i : i + 65] for i in ix])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sequences = torch.stack([data[i : i + 64] for i in torch.randint(len(data) - 64, (100,))])
    return model.eval(), sequences


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama2c", help="a llama2.c checkpoint to study instead of a small GPT")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the small GPT")
    parser.add_argument("--sequences", type=int, default=100, help="sequences (the paper: 100)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--layer", type=int, default=-1, help="layer for the per-head views")
    parser.add_argument("--out", default="views")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.llama2c:
        from attn_probe.models.llama2c import load_llama2c
        from attn_probe.models.sampling import sample_tokens

        model = load_llama2c(args.llama2c)
        sequences = sample_tokens(model, args.sequences, args.tokens,
                                  generator=torch.Generator().manual_seed(0))
    else:
        model, sequences = small_trained_gpt(args.steps)
    sequences = sequences[: args.sequences, : args.tokens]

    # MaxRank over layers: per-head rank@0.9 averaged over N sequences, max over heads
    snapshot = attn_probe.rank_profile(model, sequences.split(10), sequences=args.sequences)
    print(format_table(snapshot))
    layer = snapshot.layers[args.layer]

    # heatmaps of every head of the chosen layer, for the first sequence
    options = attn_probe.CaptureOptions(batch_rows=1, crop=None)
    with attn_probe.capture(model, options) as cap, torch.no_grad():
        model(sequences[:1])
    attention = cap.attention[layer.name][0]

    drawn = {
        "max_rank_profile.png": plots.max_rank_profile_for(snapshot),
        "collapse_map.png": plots.collapse_map_for(snapshot),
        f"head_profiles_{layer.tag}.png": plots.head_profiles_for(snapshot, layer.name),
        f"heatmaps_{layer.tag}.png": plots.attention_heatmaps(
            attention, title=f"{layer.name}: attention of every head"),
    }
    for name, plot in drawn.items():
        plot.savefig(out / name)
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
