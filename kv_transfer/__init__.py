"""How KV moves from prefill to decode workers: the page wire layout (`pages`), the
inbound transfer state machine (`state`), and two transports with one sender interface
(`grpc_transport`, `collective_transport`)."""
