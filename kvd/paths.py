"""
The URL path prefixes of the HTTP API, named once: routing, access control, body limits and
metrics all decide by them.
"""

from __future__ import annotations

#: The client API: C{/kv/{key}}.
KV = b"/kv/"
#: What kvd processes call on each other (replication, repair); never for clients.
INTERNAL = b"/internal/"
#: Many keys in one request, on the gateway (its body may carry many values).
BATCH = b"/batch"
#: Streaming a whole data set back in, on the gateway (a body of any size, spooled to disk).
IMPORT = b"/import"
#: Streaming every current entry out, on the gateway.
EXPORT = b"/export"
#: The change feed, on the gateway: every write's key, value and version.
CHANGES = b"/changes"
#: The registry API.
REGISTRY = b"/registry/"
#: A key's preference list on the gateway.
OWNERS = b"/cluster/owners/"
#: Each replica's version of a key, on the gateway (the dashboard's key lookup).
CLUSTER_KEY = b"/cluster/key/"
#: One member in the registry.
REGISTRY_NODES = b"/registry/nodes/"
