"""Cost of the field's circuits on MNIST: parameters and seconds per training step (Adam, categorical pixels).

Prints one JSON line per structure: region_graph, sum_product, units, pic_net_dim, num_params, batch,
seconds_per_step, seconds_per_epoch (50,000 training images), threads; for chow-liu-tree also tree_seconds (learning the
Chow–Liu tree from the training images). The cost depends on the structure, not on trained weights, so an
initialised circuit is timed on real MNIST batches after one warm-up step.

    python benchmarks/field_circuits_step.py --data-dir DIR                       # QuadGraph CP 64, HCLT CP 64
    python benchmarks/field_circuits_step.py --data-dir DIR --graphs quad-graph --units 32 --steps 5
    python benchmarks/field_circuits_step.py --data-dir DIR --graphs quad-graph --pic-net-dim 256   # the PIC
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vq2pc.baselines.einet import EiNet, EiNetConfig
from vq2pc.baselines.regions import learn_tree
from vq2pc.core.optim import adam
from vq2pc.data import load_dataset


def _time_steps(model: EiNet, x: torch.Tensor, batch: int, steps: int) -> float:
    """Seconds per Adam step on batches of ``x [n, S]`` (levels), after one warm-up step."""
    opt = adam(list(model.parameters()), 0.01)
    seconds = 0.0
    for i in range(steps + 1):
        b = x[i * batch : (i + 1) * batch]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        (-model.log_prob(b).mean()).backward()
        opt.step()
        seconds += (time.perf_counter() - start) if i else 0.0
    return seconds / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="directory with the MNIST IDX files (else $VQ2PC_DATA)")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--graphs", nargs="+", default=["quad-graph", "chow-liu-tree"])
    ap.add_argument("--sum-product", default="cp")
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--pic-net-dim", type=int, help="time each structure as a PIC with nets of this width")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--limit", type=int, help="cap every split (a quick check)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir, limit=args.limit)
    x = data.train_x.flatten(1).float()
    for graph in args.graphs:
        extra: dict[str, float] = {}
        tree = None
        if graph == "chow-liu-tree":
            start = time.perf_counter()
            tree = learn_tree(data.train_x, "categorical", data.levels)
            extra["tree_seconds"] = round(time.perf_counter() - start, 2)
        cfg = EiNetConfig(
            data.image_shape,
            leaf="categorical",
            levels=data.levels,
            region_graph=graph,
            tree=tree,
            sum_product=args.sum_product,
            num_input_units=args.units,
            num_sum_units=args.units,
            pic_net_dim=args.pic_net_dim,
        )
        model = EiNet(cfg)
        step = _time_steps(model, x, min(args.batch, len(x) // (args.steps + 1)), args.steps)
        line = {
            "region_graph": graph,
            "sum_product": args.sum_product,
            "units": args.units,
            "pic_net_dim": args.pic_net_dim,
            "num_params": model.num_params,
            "batch": args.batch,
            "seconds_per_step": round(step, 3),
            "seconds_per_epoch": round(step * len(data.train_x) / args.batch, 1),
            "threads": args.threads,
            **extra,
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
