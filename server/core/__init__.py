"""What a session is and what may happen to it: the table, each session's line, the batcher
that turns many sessions' steps into few model calls, and the operations beyond stepping.

Free of gRPC and of onnxruntime: faces call in, the model is called out to.
"""
