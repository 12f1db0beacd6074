"""The separation service: one long-lived process holds the demucs model(s) and serves
separations to the `stems` step of every run (plain HTTP, uvicorn + starlette).

``service`` is the server (imports torch/demucs); ``client`` is what a run uses (standard
library only, so a run process never imports torch)."""
