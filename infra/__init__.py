"""Infrastructure: the bottom layer every component uses (``infra.core``) and, at the top, the only modules that
compose components — the ``varsr`` command (``infra.cli``) and the demo (``infra.demo``) — plus cluster, MLflow-server
and container recipes. Nothing in ``infra.core`` imports a component, and no component imports ``infra.cli`` or
``infra.demo``."""
