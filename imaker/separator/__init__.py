"""The separation service: one long-lived process holds the demucs model(s) and serves
separations to the `stems` step of every run (plain HTTP, uvicorn + starlette).

``service`` is the server (imports torch/demucs); ``client`` is what a run uses (HTTP with
the standard library, filelock to auto-start the service; no torch, so a run process never
imports it)."""
