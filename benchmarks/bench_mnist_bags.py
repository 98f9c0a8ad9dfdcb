"""Simulated Megapixel MNIST bags: does the MIL head teach a lone digit? (issue 11, the instance loss)

What a Megapixel MNIST slide's gradient pass holds, without the slide: bags of `--bag` patches of 50 px
(`--target` digits of the bag's label and `--other` digits of other classes at random offsets, each patch
with a scribble half the time, the rest scribbles or black), built from the 10k MNIST test digits and the
benchmark's scribbles (`bench_megapixel_mnist`). wsiats's model (small CNN, gated pooling, linear
classifier) trains on `--bags` bags a step with Adam, with or without an instance loss beside the slide loss
(`--loss`): `top` is `wsiats.mil.instance_loss` (the label on the `--instance` patches most telling of it),
`every` the label on every patch of the bag (noisy instance labels, as tile-level training with slide labels),
`oracle` the label on the bag's label digits only (which no real slide tells: the best an instance loss can
do, a bound on the others). `--slide-weight 0` drops the slide loss. Writes the bag accuracy, the accuracy of
the instance classifier on the bag's digit patches (their own digit class) and the loss per 50 steps to JSON.

    python benchmarks/bench_mnist_bags.py --loss plain --out results/mnist_bags_plain.json
    python benchmarks/bench_mnist_bags.py --loss top --out results/mnist_bags_instance.json
    python benchmarks/bench_mnist_bags.py --loss oracle --lr 1e-3 --out results/mnist_bags_oracle_lr1e-3.json
    python benchmarks/bench_mnist_bags.py --smoke --out /tmp/bags.json   # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_megapixel_mnist as mm  # noqa: E402
from _common import code_version, machine_info  # noqa: E402

from wsiats import mil  # noqa: E402
from wsiats._io import atomic_open  # noqa: E402
from wsiats.models import ATSModel  # noqa: E402

PATCH = 50
LOSSES = ("plain", "top", "every", "oracle")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bag", type=int, default=64, help="patches a bag (the gradient pass's train_patches)")
    ap.add_argument("--target", type=int, default=5, help="digits of the bag's label in a bag")
    ap.add_argument("--other", type=int, default=4, help="digits of other classes in a bag")
    ap.add_argument("--loss", choices=LOSSES, default="top", help="the instance loss beside the slide loss")
    ap.add_argument("--instance", type=int, default=2, help="--loss top: patches a bag the instance loss labels")
    ap.add_argument("--slide-weight", type=float, default=1.0, help="weight of the slide (bag) loss")
    ap.add_argument("--bags", type=int, default=8, help="bags a step")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of the feature network")
    ap.add_argument("--head-lr-scale", type=float, default=1.0,
                    help="learning rate of the MIL head and classifier as a multiple of --lr (wsiats train's default: 3)")
    ap.add_argument("--features", choices=("l2", "raw", "scaled", "centered", "pooled"), default="l2",
                    help="l2: wsiats's unit-norm features; raw: the small CNN's output as it is; scaled: unit-norm "
                         "times sqrt(D), a bounded but larger norm; centered: unit norm after subtracting a running "
                         "mean of the features; pooled: raw features, the pooled vector unit-norm (experiments)")
    ap.add_argument("--pool-scale", type=float, default=1.0, help="--features pooled: norm of the pooled vector")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0, help="seeds the weights and the bags")
    ap.add_argument("--smoke", action="store_true", help="2 steps of small bags")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.smoke:
        args.bag, args.target, args.other, args.steps = 6, 2, 1, 2
    torch.manual_seed(args.seed)
    images, labels = mm.load_mnist()
    noise = mm.noise_patterns(np.random.default_rng(1))
    rng = np.random.default_rng(args.seed)
    room = PATCH - mm.DIGIT

    def patch(digit: int | None = None) -> np.ndarray:
        c = np.zeros((PATCH, PATCH), np.uint8)
        if rng.random() < 0.5:
            r, q = rng.integers(0, room, 2)
            c[r: r + mm.DIGIT, q: q + mm.DIGIT] = (255 * noise[rng.integers(mm.N_NOISE)]).astype(np.uint8)
        if digit is not None:
            r, q = rng.integers(0, room, 2)
            c[r: r + mm.DIGIT, q: q + mm.DIGIT] = np.maximum(c[r: r + mm.DIGIT, q: q + mm.DIGIT], images[digit])
        return c

    def bag() -> tuple[torch.Tensor, int]:
        t = int(rng.integers(mm.N_CLASSES))
        same = rng.choice(np.flatnonzero(labels == t), args.target)
        other = rng.choice(np.flatnonzero(labels != t), args.other)
        ps = [patch(d) for d in same] + [patch(d) for d in other]
        ps += [patch() for _ in range(args.bag - args.target - args.other)]
        classes = np.concatenate([labels[same], labels[other]]).astype(np.int64)
        return torch.from_numpy(np.stack(ps)[:, None].repeat(3, 1)), t, classes

    raw_out = args.features in ("raw", "centered", "pooled")
    model = ATSModel(n_classes=mm.N_CLASSES, pooling="gated", feature_norm="none" if raw_out else "l2")
    assert model.mil is not None
    if args.features == "scaled":
        fnet, unit = model.feature_net, model.feature_net.forward
        model.feature_net.forward = lambda x: unit(x) * fnet.out_dim ** 0.5  # type: ignore[method-assign]
    elif args.features == "centered":
        plain, running = model.feature_net.forward, torch.zeros(model.feature_net.out_dim)

        def centered(x: torch.Tensor) -> torch.Tensor:
            f = plain(x)
            running.mul_(0.99).add_(0.01 * f.detach().mean(0))
            return F.normalize(f - running, dim=-1)

        model.feature_net.forward = centered  # type: ignore[method-assign]
    head = [p for n, p in model.named_parameters() if n.startswith(("mil.", "classifier."))]
    opt = torch.optim.Adam([{"params": list(model.feature_net.parameters()), "lr": args.lr},
                            {"params": head, "lr": args.lr * args.head_lr_scale}])
    t0, window, curve = time.perf_counter(), [], []
    for step in range(args.steps):
        logits, ys, inst, digit_hits = [], [], [], []
        for _ in range(args.bags):
            x, y, classes = bag()
            f = model.feature_net(x)
            z = model.mil(f)[0]
            logits.append(model.classifier(args.pool_scale * F.normalize(z, dim=-1) if args.features == "pooled" else z))
            ys.append(y)
            il = model.classifier(f)
            digits = len(classes)  # the bag's digit patches come first
            digit_hits.append((il[:digits].detach().argmax(1).numpy() == classes).mean())
            if args.loss == "top":
                inst.append(mil.instance_loss(il, y, top=args.instance))
            elif args.loss == "every":
                inst.append(F.cross_entropy(il, torch.full((len(il),), y)))
            elif args.loss == "oracle":
                inst.append(F.cross_entropy(il[: args.target], torch.full((args.target,), y)))
        out, target = torch.stack(logits), torch.tensor(ys)
        loss = args.slide_weight * F.cross_entropy(out, target)
        if inst:
            loss = loss + torch.stack(inst).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append((float(loss.detach()), float((out.argmax(1) == target).float().mean()),
                       float(np.mean(digit_hits))))
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            mean = np.mean(window, axis=0)
            curve.append({"step": step + 1, "loss": float(mean[0]), "bag_accuracy": float(mean[1]),
                          "digit_patch_accuracy": float(mean[2]), "seconds": time.perf_counter() - t0})
            window = []
    result = {"benchmark": "mnist_bags", "smoke": args.smoke, "settings": {k: v for k, v in vars(args).items()
                                                                           if k != "out"},
              "curve": curve, "code": code_version(), "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out, "w") as fh:
        fh.write(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
