"""Run recipes (`get_config(arg)` files for `train.py --config`)."""
