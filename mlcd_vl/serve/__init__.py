"""Inference (floor 4 of the house, `mlcd_vl/__init__.py`): one engine, one decode loop, three front ends.

- `requests`: settings, requests, prompts, results, image sources; `stops`: stop strings and streamed text pieces.
- `engine`: `Engine` (prepare a request, `generate`, `stream`, `chat`); `decode`: `RunningBatch`, the one decode loop
  that `generate`, `stream` and the batcher run.
- `batcher`: the API's worker (continuous or static scheduling); `api` (+ `api_schema`, `intake`): the
  OpenAI-compatible server; `web`: the Gradio demo; `cli_chat`: `mlcd-vl chat`; `ask`: `mlcd-vl ask`.
"""
