"""`mlcd-vl plan RECIPE --gpus N`: the memory, steps and time a recipe needs, before it runs.

Per GPU: parameters, gradients and optimizer states for DDP and ZeRO-1/2/3 (and ZeRO-3 with CPU offload), the
activations of the largest micro-batch with and without gradient checkpointing, the loss and a runtime reserve;
per node: host memory (the model built per rank, records, offloaded states, the final save). Then the optimizer
steps and an estimated wall time at a stated MFU, and what to change when it does not fit. Models are sized on the
meta device from their configs (presets need no download). Give the data's length table (`--lengths
lengths.npz`, written by `mlcd-vl data check` into its --out folder before any run, or by `mlcd-vl train` into
OUTPUT_DIR) for the real micro-batches; without one, rows of `data.max_length` tokens, every token supervised, are
assumed: an upper bound. The loss is the one training runs: the recipe's `optim.loss_impl` and
`optim.loss_chunk_tokens` (override them like any recipe key, e.g. `optim.loss_impl=full`).
"""

from __future__ import annotations

import argparse
import json

GPU_TYPES = ("H100", "H200", "A100")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="training recipe YAML (configs/recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, as for `mlcd-vl train` (e.g. batch.per_device_batch_size=1)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all (data-parallel ranks)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (default 1)")
    parser.add_argument("--gpu", choices=GPU_TYPES, default="H100", help="GPU type: peak bf16 FLOP/s (default H100)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="memory per GPU in GiB (default: the type's, 80 for H100 / A100, 141 for H200)")
    parser.add_argument("--host-memory", type=float, default=None, metavar="GIB", help="host memory per node, GiB")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation for the time (default 0.40)")
    parser.add_argument("--lengths", metavar="NPZ",
                        help="the data's length table: lengths.npz of `mlcd-vl data check` or of a run's OUTPUT_DIR")
    parser.add_argument("--supervised-fraction", type=float, default=None,
                        help="supervised tokens per position of the largest micro-batch (default: from the length "
                             "table's supervised counts, else 1.0, the bound)")
    parser.add_argument("--reserve", type=float, default=None, metavar="GIB",
                        help="per-GPU allowance for the CUDA context, NCCL and fragmentation (default 4)")
    parser.add_argument("--samples", type=int, default=None, help="records, without a length table or dataset preset")
    parser.add_argument("--text-tokens", type=int, default=256,
                        help="text tokens of a typical sample, without a length table (default 256)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from mlcd_vl.errors import UsageError, first_line
    from mlcd_vl.plan.planner import DEFAULT_RESERVE_GIB, PlanRequest, make_plan
    from mlcd_vl.plan.report import render
    from mlcd_vl.train.config import load_config

    request = PlanRequest(gpus=args.gpus, nodes=args.nodes, gpu=args.gpu, gpu_memory_gib=args.gpu_memory,
                          mfu=args.mfu, lengths=args.lengths,
                          supervised_fraction=args.supervised_fraction,
                          reserve_gib=DEFAULT_RESERVE_GIB if args.reserve is None else args.reserve,
                          host_memory_gib=args.host_memory, samples=args.samples, text_tokens=args.text_tokens)
    try:
        config = load_config(args.recipe, args.overrides)
        plan = make_plan(config, request, recipe=args.recipe, overrides=tuple(args.overrides))
    except (ValueError, FileNotFoundError) as error:  # a bad cluster option, loss setting or file: one line, exit 2
        if isinstance(error, UsageError):  # a recipe key (ConfigError) or a model (PlanInputError)
            raise
        raise UsageError(first_line(error)) from None
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0
