"""The v2 protocol's gRPC service, inference.GRPCInferenceService: protobuf in, `Inference` calls, protobuf out.

It is registered like rnnserve's own services (`wire.Parsed`, `guard.Guarded`), so a request that
does not parse, a caller's mistake and a server fault are answered as on every other face, tokens
and mTLS open it alike, and its calls are counted with theirs. ModelStreamInfer answers each request
in order, a failed one in-band (error_message, as Triton does) while the stream goes on; requests
of different sequences on one stream run together, those of one sequence one after another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from google.protobuf import json_format
from google.protobuf.message import Message

from rnnserve.kserve_v2 import inference_pb2 as v2
from rnnserve.server.core.engine import Engine
from rnnserve.server.core.errors import InvalidArgument, RnnserveError, to_status
from rnnserve.server.faces.auth import caller
from rnnserve.server.faces.kserve import describe, tensors
from rnnserve.server.faces.kserve.infer import InferAnswer, InferCall, Inference
from rnnserve.server.faces.replies import InOrder, answer_in_order
from rnnserve.server.faces.servicer import deadline

SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
PARAMETER_KINDS = ("bool_param", "int64_param", "string_param", "double_param", "uint64_param")


def parameters_of(parameters) -> dict[str, object]:
    """A request's parameters map as plain values."""
    values = {}
    for name, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[name] = None if kind is None else getattr(parameter, kind)
    return values


def call_of(request: v2.ModelInferRequest) -> InferCall:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument("raw_input_contents", f"{len(raw)} entries for {len(request.inputs)} inputs: "
                                                            "one per input, or none")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        if tensor.datatype not in tensors.DATATYPES:
            raise InvalidArgument(tensor.name, f"datatype {tensor.datatype!r} is not one rnnserve reads: its inputs "
                                               "are INT64 (TOKEN_IDS) and BYTES (TEXT)")
        shape = list(tensor.shape)
        if raw:
            data = tensors.from_raw(tensor.name, tensor.datatype, shape, raw[index])
        else:
            data = tensors.from_list(tensor.name, tensor.datatype, shape, _contents(tensor))
        inputs.append(tensors.Tensor(tensor.name, tensor.datatype, data))
    return InferCall(request.model_name, request.model_version, request.id, parameters_of(request.parameters),
                     inputs, [output.name for output in request.outputs])


# The field of InferTensorContents that holds each datatype's elements (FP16 has none: raw contents only).
CONTENTS_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                   "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                   "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                   "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _contents(tensor: v2.ModelInferRequest.InferInputTensor) -> list:
    """The typed list of the tensor's datatype."""
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(tensor.name, f"{tensor.datatype} elements travel in raw_input_contents only")
    return list(getattr(tensor.contents, field))


def response_of(answer: InferAnswer) -> v2.ModelInferResponse:
    response = v2.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version, id=answer.id)
    for name, value in answer.parameters.items():
        response.parameters[name].int64_param = value
    for tensor in answer.outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensors.to_raw(tensor))
    return response


def parsed(values: dict, message: Message) -> Message:
    return json_format.ParseDict(values, message)


class V2Servicer:
    """inference.GRPCInferenceService over `Inference`; `idle_seconds` is what ModelConfig reports as the
    sequences' idle timeout (the sessions' default time-to-live)."""

    def __init__(self, engine: Engine, inference: Inference, idle_seconds: int,
                 on_in_band_error: Callable[[int], None] | None = None):
        self._engine = engine
        self._inference = inference
        self._idle_seconds = idle_seconds
        self._on_in_band_error = on_in_band_error

    async def ServerLive(self, request: v2.ServerLiveRequest, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._engine.ready)

    async def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        try:
            model = self._inference.model(request.name, request.version)
        except RnnserveError:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=self._engine.ready and not model.retiring)

    async def ServerMetadata(self, request: v2.ServerMetadataRequest, context) -> v2.ServerMetadataResponse:
        return parsed(describe.server_metadata(), v2.ServerMetadataResponse())

    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context) -> v2.ModelMetadataResponse:
        return parsed(describe.model_metadata(self._inference, request.name, request.version),
                      v2.ModelMetadataResponse())

    async def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        config = describe.model_config(self._inference, request.name, request.version, self._idle_seconds)
        return v2.ModelConfigResponse(config=parsed(config, v2.ModelConfig()))

    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        return response_of(await self._inference.infer(call_of(request), caller(context), deadline(context)))

    async def ModelStreamInfer(self, requests, context) -> None:
        owner = caller(context)
        last_of_sequence: dict[object, asyncio.Future] = {}

        def submit(request: v2.ModelInferRequest) -> asyncio.Future:
            key = (request.model_name, _sequence_key(request))
            reply = asyncio.ensure_future(self._after(last_of_sequence.get(key), request, owner))
            last_of_sequence[key] = reply
            reply.add_done_callback(lambda done: _forget(last_of_sequence, key, done))
            return reply

        await answer_in_order(requests, submit, lambda replies: self._write_in_order(replies, context))

    async def _after(self, previous: asyncio.Future | None, request: v2.ModelInferRequest,
                     owner: str) -> v2.ModelInferResponse:
        """`request`'s answer, run once the sequence's previous request has been answered."""
        if previous is not None:
            await asyncio.wait((previous,))
        return response_of(await self._inference.infer(call_of(request), owner, None))

    async def _write_in_order(self, replies: InOrder[v2.ModelInferRequest], context) -> None:
        async for _request, reply in replies:
            error = reply.exception()
            if error is None:
                await context.write(v2.ModelStreamInferResponse(infer_response=reply.result()))
                continue
            status = to_status(error)
            if self._on_in_band_error is not None:
                self._on_in_band_error(status.code)
            await context.write(v2.ModelStreamInferResponse(error_message=status.message))


def _sequence_key(request: v2.ModelInferRequest) -> object:
    """What tells the request's sequence apart on a stream (its id's kind and value); None without one."""
    parameter = request.parameters.get("sequence_id")
    if parameter is None:
        return None
    kind = parameter.WhichOneof("parameter_choice")
    return kind == "string_param", getattr(parameter, kind) if kind else None


def _forget(last_of_sequence: dict[object, asyncio.Future], key: object, done: asyncio.Future) -> None:
    """Drop a sequence's entry once its last request is answered: the map holds only sequences in flight."""
    if last_of_sequence.get(key) is done:
        del last_of_sequence[key]
