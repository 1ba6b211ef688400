"""LightningModules: hypernetwork meta-training, tiny-LALM pretraining; entry-point helpers."""
