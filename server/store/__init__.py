"""Sessions at rest: snapshot files across restarts, exported blobs, and Redis for replicas."""
