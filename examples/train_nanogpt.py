"""A plain PyTorch training loop (nanoGPT-style model) with the probe attached.

    python examples/train_nanogpt.py --steps 300 --log-dir runs/nanogpt
    tensorboard --log-dir runs/nanogpt
"""

import argparse

import torch

import attn_probe
from attn_probe.models.corpus import builtin_corpus
from attn_probe.models.gpt import GPT, GPTConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--log-dir", default="runs/nanogpt")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = builtin_corpus().long()
    model = GPT(GPTConfig(block_size=args.block_size, n_layer=args.layers, n_head=4, n_embd=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    with attn_probe.AttentionProbe(
        model, log_dir=args.log_dir, every=args.every,
        capture=attn_probe.CaptureOptions(batch_rows=2),
    ) as probe:
        for step in range(args.steps):
            ix = torch.randint(len(data) - args.block_size - 1, (args.batch_size,))
            batch = torch.stack([data[i : i + args.block_size + 1] for i in ix])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            probe.step()  # logs what this step's forward measured, at this step
            if step % args.every == 0:
                print(f"step {step:5d}  loss {loss.item():.3f}  "
                      f"max rank90 per layer {probe.last.max_rank_profile().round(2).tolist()}")
    print(f"logs in {args.log_dir}: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
