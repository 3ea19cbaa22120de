"""`python -m parallax_lightning {fit,validate,test,predict} --config FILE.yaml` (see cli.py)."""

from parallax_lightning.cli import main

if __name__ == "__main__":
    main()
