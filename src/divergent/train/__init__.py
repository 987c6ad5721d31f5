"""Training loops: classifier, LM, RL and preference; checkpointing."""
