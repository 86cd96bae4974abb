"""Batches of source/target pairs for seq2seq training, and the held-out measurements.

Sources and targets are right-padded to the longest of the batch; label padding is -100, which
transformers' loss ignores. :func:`exact_match` is the training acceptance measure: the greedy
output's text equal to the target's.
"""

from __future__ import annotations

from typing import Any

from llmtool.errors import UsageError
from llmtool.seq2seq.pairs import Pair, target_ids


def encode_pairs(
    tokenizer: Any, pairs: list[Pair], eos: int, limit: int
) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids ending in EOS) per pair; refuses sides past ``limit`` tokens."""
    rows = []
    for p in pairs:
        src, tgt = list(tokenizer(p.source)["input_ids"]), target_ids(tokenizer, p.target, eos)
        if len(src) > limit or len(tgt) > limit:
            raise UsageError(
                f"{p.where} has {max(len(src), len(tgt))} tokens, more than the preset's {limit}",
                "shorten the pair.",
            )
        rows.append((src, tgt))
    return rows


def make_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    src_len = max(len(s) for s, _ in rows)
    tgt_len = max(len(t) for _, t in rows)
    ids = torch.full((len(rows), src_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), src_len), dtype=torch.long)
    labels = torch.full((len(rows), tgt_len), -100, dtype=torch.long)
    for i, (s, t) in enumerate(rows):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        labels[i, : len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def val_loss(model: Any, rows: list[tuple[list[int], list[int]]], pad: int, device: Any) -> float:
    """Mean NLL per held-out target token."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            batch = {k: v.to(device) for k, v in make_batch(rows[i : i + 64], pad).items()}
            logits = model(**batch).logits
            labels = batch["labels"]
            total += torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    model.train()
    return total / max(count, 1)


def exact_match(model: Any, tokenizer: Any, pairs: list[Pair], device: Any) -> float:
    """Fraction of pairs whose greedy output (PyTorch) equals the target text exactly."""
    import torch

    model.eval()
    hits = 0
    for i in range(0, len(pairs), 64):
        chunk = pairs[i : i + 64]
        enc = tokenizer([p.source for p in chunk], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=64, do_sample=False, num_beams=1)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        hits += sum(t.strip() == p.target.strip() for t, p in zip(texts, chunk, strict=True))
    model.train()
    return hits / len(pairs)
