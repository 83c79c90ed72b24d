"""What the v2 protocol's metadata calls answer, as the REST face's JSON: the gRPC face parses the same
dicts into its messages (protobuf's JSON mapping has the same field names), so both describe alike."""

from __future__ import annotations

from importlib import metadata

from rnnserve.server.core.served_model import ServedModel
from rnnserve.server.faces.kserve.infer import (OUTPUT_DATATYPES, TEXT, TOKEN_IDS, WHOLE_VOCABULARY, Inference)

PLATFORM = "onnxruntime_onnx"
# Triton's protocol extensions that rnnserve serves: sequences, and its parameters and binary data over REST.
EXTENSIONS = ["sequence", "parameters", "binary_tensor_data", "model_configuration"]
CONFIG_TYPES = {"INT64": "TYPE_INT64", "FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}


def server_metadata() -> dict:
    return {"name": "rnnserve", "version": metadata.version("rnnserve"), "extensions": EXTENSIONS}


def _tensors(model: ServedModel, inference: Inference) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs of `model` (name, datatype, shape; -1 for any size, top_k for the top outputs)."""
    vocab = inference.vocab_size(model)
    inputs = [{"name": TOKEN_IDS, "datatype": "INT64", "shape": [1, -1]},
              {"name": TEXT, "datatype": "BYTES", "shape": [1]}]
    outputs = [{"name": name, "datatype": datatype, "shape": [1, vocab if name in WHOLE_VOCABULARY else -1]}
               for name, datatype in OUTPUT_DATATYPES.items()]
    return inputs, outputs


def model_metadata(inference: Inference, name: str, version: str) -> dict:
    model = inference.model(name, version)
    inputs, outputs = _tensors(model, inference)
    return {"name": model.bundle.name, "versions": inference.versions(model.bundle.name), "platform": PLATFORM,
            "inputs": inputs, "outputs": outputs}


def model_config(inference: Inference, name: str, version: str, idle_seconds: int) -> dict:
    """Triton's configuration of the model: a stateful model whose sequences end after `idle_seconds` idle."""
    model = inference.model(name, version)
    inputs, outputs = _tensors(model, inference)
    return {"name": model.bundle.name, "platform": PLATFORM, "backend": "onnxruntime", "max_batch_size": 0,
            "input": [{"name": tensor["name"], "data_type": CONFIG_TYPES[tensor["datatype"]], "dims": tensor["shape"],
                       "optional": True} for tensor in inputs],
            "output": [{"name": tensor["name"], "data_type": CONFIG_TYPES[tensor["datatype"]],
                        "dims": tensor["shape"]} for tensor in outputs],
            "sequence_batching": {"max_sequence_idle_microseconds": str(idle_seconds * 1_000_000)}}
