"""The serving process, grouped by the path a step takes through it.

A request enters at a face (`faces`: gRPC and HTTP), is decided in the core (`core`: sessions,
their lines, the batcher, session operations), runs on the model (`model`: onnxruntime and the
state pool) and may be kept at rest in a store (`store`: snapshots, exported blobs, Redis).
`app`, `main` and `settings` put the layers together; `metrics` and `logs` watch all of them.
"""
