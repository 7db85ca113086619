"""Networks, training, weights and model cards of the DL reconstruction (see MODEL_CARD_*.md)."""
