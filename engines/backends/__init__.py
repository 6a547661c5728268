"""Backends behind `engines.load_backend`; each module imports its runtime lazily, so a missing
optional runtime (TensorRT, onnxruntime-gpu) only disables that backend."""
