"""KDAS: knowledge distillation via attention supervision for real-time polyp segmentation.

Research software, not a medical device.
"""

__version__ = "0.1.0"
