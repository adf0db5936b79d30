"""A Hugging Face model in a hand-written training loop, probed through fast SDPA attention.

The model is a small Llama built from a config (no download); swap in
``AutoModelForCausalLM.from_pretrained(...)`` for your own. Needs ``pip install "attn_probe[hf]"``.

    python examples/train_huggingface.py --steps 200 --log-dir runs/hf-llama
"""

import argparse

import torch

import attn_probe
from attn_probe.models.corpus import builtin_corpus


def main(argv=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--log-dir", default="runs/hf-llama")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.tokens)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = builtin_corpus().long()

    with attn_probe.AttentionProbe(model, log_dir=args.log_dir, every=args.every) as probe:
        for step in range(args.steps):
            ix = torch.randint(len(data) - args.tokens, (8,))
            input_ids = torch.stack([data[i : i + args.tokens] for i in ix])
            loss = model(input_ids=input_ids, labels=input_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            probe.step()
            if step % args.every == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}  "
                      f"MaxRank {probe.last.max_rank_profile().round(2).tolist()}")
    print(f"logs in {args.log_dir}: tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
