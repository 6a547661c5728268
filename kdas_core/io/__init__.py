"""Files: checkpoints (safetensors + metadata), whole-or-nothing writes, the bundled asset paths."""
