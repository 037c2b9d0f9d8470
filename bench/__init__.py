"""qmoi-sync's benchmark harness (see bench/README.md). `python -m bench run ...` compares
qmoi-sync with Syncthing side by side (bench/versus/); `python bench/run.py ...` runs the
qmoi-sync-only target scenarios."""
