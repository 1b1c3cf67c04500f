#!/usr/bin/env python
"""Data-parallel training with fastnn: DistributedDataParallel + fastnn.nn.SyncBatchNorm.

    python examples/ddp_train.py --model d2l_resnet18 --world-size 2 --epochs 2
    python examples/ddp_train.py --model lenet_bn --epochs 1 --max-steps 20

Spawns --world-size processes on this machine (gloo on CPUs, NCCL with one GPU per process).
Each rank trains on its shard of the data (DistributedSampler); batch-norm statistics are taken
over the whole group by fastnn's SyncBatchNorm, whose conversion keeps fastnn's fused BN+ReLU and
BN+add+ReLU fused. Data as in examples/train.py (FashionMNIST/MNIST on disk, else scikit-learn's
digits). Rank 0 prints the loss and the test accuracy every epoch.
"""
import argparse
import datetime
import gc
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train as single  # noqa: E402  (examples/train.py: data, models, evaluation)

import fastnn  # noqa: E402


def _run(rank, args, init_file, result_file):
    use_cuda = args.device == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        # The model, DDP wrapper and optimizer (held in reference cycles) are freed here, while
        # the process group still exists: left to the interpreter's exit, tearing down what
        # they hold of the gloo group aborted about one run in seven.
        _train(rank, args, result_file, use_cuda)
        gc.collect()
    finally:
        dist.destroy_process_group()


def _train(rank, args, result_file, use_cuda):
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    device = torch.device(f"cuda:{rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    (x_train, y_train, x_test, y_test), name = single.load_data(args.dataset, args.data_root)
    model, size, channels = single.build_model(args.model, fused=True)
    model = fastnn.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
    ddp = DistributedDataParallel(model, device_ids=[rank] if use_cuda else None)
    prepare = single.make_prepare(args.image_size or size, channels)
    train_set = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(train_set, num_replicas=args.world_size, rank=rank,
                                 shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=256)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    losses = []
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        ddp.train()
        for step, (x, y) in enumerate(loader):
            if args.max_steps and step >= args.max_steps:
                break
            x, y = prepare(x.to(device)), y.to(device)
            out = ddp(x)
            loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if rank == 0:
            acc = single.evaluate(model, test_loader, prepare, device)
            print(f"epoch {epoch}: {name}, last loss {losses[-1]:.4f}, test acc {acc:.3f}",
                  flush=True)
    # Every rank holds the same running statistics: they came from the group's batch.
    bn = next(m for m in model.modules() if isinstance(m, fastnn.nn.SyncBatchNorm))
    stats = torch.stack([bn.running_mean.float().cpu(), bn.running_var.float().cpu()])
    all_stats = [torch.empty_like(stats.to(device)) for _ in range(args.world_size)]
    dist.all_gather(all_stats, stats.to(device))
    if rank == 0:
        spread = max((s - all_stats[0]).abs().max().item() for s in all_stats)
        torch.save({"losses": losses, "running_stat_spread": spread}, result_file)
        k = min(3, len(losses))
        print(f"mean loss of the first {k} steps {sum(losses[:k]) / k:.4f}, "
              f"of the last {k} {sum(losses[-k:]) / k:.4f}")
        print(f"running statistics identical across ranks: max difference {spread:.3g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="d2l_resnet18", choices=sorted(single.MODELS))
    parser.add_argument("--dataset", default="auto", choices=single.DATASETS)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per collective")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"--device cuda needs {args.world_size} GPUs, found "
                         f"{torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        result_file = os.path.join(tmp, "result.pt")
        mp.spawn(_run, args=(args, init_file, result_file), nprocs=args.world_size, join=True)
        return torch.load(result_file)


if __name__ == "__main__":
    main()
