"""The video pipeline shared by the window and headless mode.

One module per stage, one job per stage:

    source      decode a file (PyAV) or grab a camera (OpenCV V4L2)  -> Frame
    preprocess  resize to the model's input size                     -> Frame.model_input
    inference   owns the backend (and every CUDA object)             -> Frame.probs
    postprocess probabilities -> binary mask at frame resolution     -> Frame.mask
    overlay     tinted fill + contour                                -> Frame.overlay
    recorder    H.264 MP4 of the overlaid stream (own encode thread)

`runner.Pipeline` wires them with threads and channels so decode, overlay and encode hide
behind inference; `stats` measures what the user sees.
"""
