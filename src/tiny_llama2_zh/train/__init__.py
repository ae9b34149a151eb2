"""Training: one plumbing (`runner`, `callbacks`, `checkpoints`) and a thin recipe per stage (`pretrain`, ...)."""
