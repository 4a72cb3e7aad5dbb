"""Layer 4: one pipeline per method, composing the Ray pieces of `actors/`."""
