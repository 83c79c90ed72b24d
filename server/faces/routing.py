"""What a Stream's initial metadata tells the rnnserve client about routing (its twin: client/connection.py).

Replicas sharing sessions through Redis sit behind a proxy that sends each call to the replica its
`x-session-id` hashes to. A Stream the client shares among its sessions names none, so it would
pull every session it carries onto one replica. Such a server says so when a Stream opens, and
the client then gives each session a stream of its own carrying its id.
"""

ROUTING_HEADER, ROUTING_BY_SESSION = "x-rnnserve-routing", "by-session"
STREAM_ROUTED_BY_SESSION = ((ROUTING_HEADER, ROUTING_BY_SESSION),)
