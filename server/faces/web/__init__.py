"""The HTTP/JSON face: the same operations as gRPC, answered by the same servicer methods.

`routes` is the one table from HTTP routes to RPCs; `calls` runs a route's RPC on the servicer
with a stand-in for grpc's context; `status` turns a google.rpc.Status into an HTTP answer;
`app` builds the Starlette application and `face` serves it with uvicorn in the gRPC server's
event loop. Named `web`, not `http`, so that no path setting can shadow the standard library's.
"""
