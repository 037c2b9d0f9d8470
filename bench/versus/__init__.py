"""qmoi-sync side by side with Syncthing, in one run (`python -m bench run`, see cli.py)."""
