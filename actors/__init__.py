"""Layer 3: the Ray pieces (model-hosting actors, Ray Data stages, the Ray Train + DeepSpeed trainer)."""
