"""The Open Inference Protocol face (KServe v2, with Triton's sequences): gRPC (`service`) and REST (`rest`),
both translating to `infer`, which calls the engine the other faces call."""
