"""The model side: onnxruntime running a bundle, and the state pool that holds every session's rows."""
