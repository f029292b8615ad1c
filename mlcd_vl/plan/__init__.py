"""`mlcd-vl plan`: what a recipe will need before it runs (GPU and host memory, steps, wall time, what to change).

* `architectures` - the configs of the preset LLMs and towers (so no download is needed) and dataset sizes;
* `model_size` - the composite built on the meta device: exact parameter counts per part, trainable as training
  trains them, and the shapes the activation model needs;
* `memory` - the memory model: every term in one place, as plain arithmetic (no torch);
* `workload` - micro-batch sizes from a length table, visual tokens, steps and time from FLOPs;
* `report` - the readable tables and the JSON;
* `command` - the CLI (`configure_parser` / `run`).
"""
