"""Training throughput: mexit's trainer vs a plain PyTorch loop on the same model and data.

Both sides start from identical weights, see the same samples and take the same optimiser steps; the
baseline is the loop a PyTorch user would write (TensorDataset + shuffled DataLoader, summed
cross-entropy over exits). Epochs alternate between the two so that machine drift affects both, and
the median samples/s per side is reported. Goal: mexit / baseline >= 0.9.

    python benchmarks/train_throughput.py [--out benchmarks/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mexit._io import atomic_write_json, provenance
from mexit.data import load_dataset, make_splits
from mexit.train.trainer import exit_weights, train_epoch
from mexit.train.zoo import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CASES = {
    "location-fcn18-1-x6": dict(dataset="location", root=SHARED / "location", arch="fcn18-1", exits=6, limit=None),
    "cifar10-resnet56-x6": dict(dataset="cifar10", root=SHARED / "cifar-10-batches-py", arch="resnet56", exits=6,
                                limit=1024),
}


def plain_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader) -> None:
    model.train()
    criterion = nn.CrossEntropyLoss()
    for xb, yb in loader:
        outputs = model(xb)
        loss = sum(criterion(out, yb) for out in outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run_case(name: str, case: dict, epochs: int, batch_size: int, seed: int) -> dict:
    ds = load_dataset(case["dataset"], case["root"])
    splits = make_splits(ds.y, seed=seed, max_per_split=case["limit"])
    idx = splits.target_train
    x, y = ds.x[idx], ds.y[idx]
    torch.manual_seed(seed)
    base = build_model(case["arch"], exits=case["exits"], input_shape=ds.input_shape, num_classes=ds.num_classes,
                       normalization=ds.normalization)
    m_mexit, m_plain = copy.deepcopy(base), copy.deepcopy(base)
    opt_mexit = torch.optim.Adam(m_mexit.parameters(), lr=1e-3)
    opt_plain = torch.optim.Adam(m_plain.parameters(), lr=1e-3)
    xt = torch.from_numpy(x).float().div_(255.0) if x.dtype == np.uint8 else torch.from_numpy(x).float()
    loader = DataLoader(TensorDataset(xt, torch.from_numpy(y)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    weights = exit_weights(base.num_exits, "sum", 1, epochs)
    rates: dict[str, list[float]] = {"mexit": [], "plain": []}
    for epoch in range(epochs + 1):  # epoch 0 is a warm-up for both, not recorded
        for side in (("mexit", "plain") if epoch % 2 else ("plain", "mexit")):
            t0 = time.perf_counter()
            if side == "mexit":
                train_epoch(m_mexit, opt_mexit, x, y, batch_size=batch_size, weights=weights,
                            generator=np.random.default_rng([seed, epoch]), device=torch.device("cpu"))
            else:
                plain_epoch(m_plain, opt_plain, loader)
            dt = time.perf_counter() - t0
            if epoch:
                rates[side].append(len(x) / dt)
    mexit_rate, plain_rate = statistics.median(rates["mexit"]), statistics.median(rates["plain"])
    return {
        "case": name,
        "samples": len(x),
        "epochs_timed": epochs,
        "batch_size": batch_size,
        "mexit_samples_per_s": mexit_rate,
        "plain_samples_per_s": plain_rate,
        "ratio": mexit_rate / plain_rate,
        "goal": ">= 0.9",
        "met": mexit_rate / plain_rate >= 0.9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_case(name, CASES[name], args.epochs, args.batch_size, args.seed) for name in args.cases]
    record = {"benchmark": "train_throughput", "results": results,
              "provenance": provenance(seed=args.seed, threads=args.threads)}
    atomic_write_json(args.out, record)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
