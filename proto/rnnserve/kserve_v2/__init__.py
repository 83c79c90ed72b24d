"""The Open Inference Protocol (KServe v2) messages rnnserve serves, generated from inference.proto."""
