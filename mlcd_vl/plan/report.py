"""The plan as readable tables (GiB, counts with separators); `--json` prints the dict itself."""

from __future__ import annotations

from mlcd_vl.console import duration, text_table
from mlcd_vl.plan.memory import GIB

GPU_ROWS = ("parameters", "gradients", "optimizer states", "buffers", "activations", "loss", "reserve")


def gib(value: float) -> str:
    return f"{value / GIB:,.1f}"


def table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """The console's table as lines: the `left` columns left-aligned (text), the others right (numbers, yes / NO)."""
    return text_table(header, rows, left=left).splitlines()


def render(plan: dict) -> str:
    cluster, model, micro = plan["cluster"], plan["model"], plan["micro_batch"]
    out = [f"plan: {plan['recipe']}" + (f" {' '.join(plan['overrides'])}" if plan["overrides"] else ""),
           f"cluster: {cluster['gpus']} x {cluster['gpu']} ({cluster['gpu_memory_gib']:g} GiB) on {cluster['nodes']} "
           f"node(s), {cluster['ranks_per_node']} rank(s) per node; {plan['precision']}; gradient checkpointing "
           f"{'on' if plan['gradient_checkpointing'] else 'off'}", ""]

    out.append(f"model ({model['class']}): parameters")
    parts = ("vision_tower", "projector", "language_model")
    rows = [[part, f"{model['parameters'][part]:,}", f"{model['trainable'][part]:,}"] for part in parts]
    rows.append(["all", f"{sum(model['parameters'].values()):,}", f"{sum(model['trainable'].values()):,}"])
    out += table(["part", "total", "trainable"], rows) + [""]

    out.append(f"largest micro-batch per GPU: {micro['positions']:,} positions ({micro['how']}), "
               f"at most {micro['crops']:,} crops through the tower")
    acts = plan["activations"]
    rows = [[label, f"{acts[key]['per_position'] / 1024:,.1f} KiB", f"{acts[key]['per_crop'] / 2**20:,.1f} MiB",
             gib(acts[key]["micro_batch"])]
            for label, key in (("with gradient checkpointing", "with_checkpointing"),
                               ("without", "without_checkpointing"))]
    out += table(["activations", "per LLM position", "per crop (tower)", "micro-batch GiB"], rows)
    if acts["attention_mask"]:
        out.append(f"(micro-batch figures include the padded batch's 4D attention mask: {gib(acts['attention_mask'])} "
                   "GiB)")
    loss = plan["loss"]
    other = ("chunked", loss["chunked_bytes"]) if loss["runs"] == "full" else ("full logits", loss["full_bytes"])
    out += [f"loss: {loss['supervised_tokens']:,.0f} supervised tokens x {loss['vocab']:,} vocabulary, "
            f"{loss['how']}: {gib(loss['bytes'])} GiB ({other[0]} would be {gib(other[1])} GiB)", ""]

    scenarios = plan["scenarios"]
    header = ["per GPU, GiB"] + [s["scenario"] + (" *" if s["recipe"] else "") for s in scenarios]
    rows = [[name] + [gib(s["gpu"][name]) for s in scenarios] for name in GPU_ROWS]
    rows.append(["total"] + [gib(s["gpu_total"]) for s in scenarios])
    rows.append([f"fits {cluster['gpu_memory_gib']:g} GiB"] + ["yes" if s["fits"] else "NO" for s in scenarios])
    rows.append(["largest micro-batch (positions)"] + [f"{s['largest_fitting_positions']:,}" for s in scenarios])
    rows.append(["host per node, GiB (peak)"] + [gib(s["host_per_node"]["peak"]) for s in scenarios])
    if cluster["host_memory_gib"] is not None:
        rows.append([f"host fits {cluster['host_memory_gib']:g} GiB"]
                    + ["yes" if s["host_fits"] else "NO" for s in scenarios])
    out += table(header, rows) + ["(* the recipe's setting)", ""]

    own = next(s for s in scenarios if s["recipe"])
    host = own["host_per_node"]
    out.append(f"host memory per node ({own['scenario']}): start-up {gib(host['startup'])} GiB, training "
               f"{gib(host['steady'])} GiB, node 0 at the final save {gib(host['final_save'])} GiB")
    out += table(["term", "GiB", "what"], [[t["name"], gib(t["bytes"]), t["note"]] for t in host["terms"]],
                 left=(0, 2))
    out.append("")

    run = plan["run"]
    if run is None:
        out.append("steps and time: unknown number of samples (give --lengths or --samples)")
    else:
        out += [f"steps: {run['steps']:,} optimizer steps ({run['samples']:,} samples, "
                f"{run['micro_batches_per_rank']:,} micro-batches per GPU per epoch)",
                f"compute: {run['tokens']:,.0f} LLM tokens, {run['tower_tokens']:,.0f} tower tokens, "
                f"{run['flops']:.3g} FLOPs -> {duration(run['seconds'])} at {100 * cluster['mfu']:g}% MFU "
                f"({cluster['peak_flops'] / 1e12:g} TFLOP/s per GPU)",
                f"  ({run['how']})"]
    out += ["", "what to change:"] + [f"  - {line}" for line in plan["suggestions"]]
    out += ["", "assumptions:"] + [f"  - {line}" for line in plan["assumptions"]]
    return "\n".join(out)
