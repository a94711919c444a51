"""The discrete-event simulator of the whole cluster and `splitserve plan` (DESIGN.md: sim ──> router.routing, planner, engine.scheduler)."""  # noqa: E501
