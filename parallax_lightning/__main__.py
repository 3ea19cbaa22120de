"""`python -m parallax_lightning {fit,validate,test,predict} --config FILE.yaml` (see cli.py), and
`{eval,export,generate} --ckpt_path CKPT ...` for trained models (evaluation.py, export.py, generate_cli.py)."""

from parallax_lightning.cli import main

if __name__ == "__main__":
    main()
