"""How callers reach the server: the gRPC services and the HTTP/JSON face, with auth and TLS.

Faces translate and check; they decide nothing about sessions (that is `core`).
"""
