"""Cross-attention (ITM) re-ranking: the model, candidates' stored features, and its training."""
